//! Layered configuration: built-in defaults, then an optional YAML file, then `LACUNA_*`
//! environment variables; `lacuna serve` applies its flags last.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use lacuna_model::KvDtype;
use serde::{Deserialize, Serialize};

/// Where the model runs. Only the CPU engine exists today.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Cpu,
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            other => Err(format!("unknown backend {other:?} (known: cpu)")),
        }
    }
}

/// Everything `lacuna serve` is configured by. Field names are the config file's keys; the
/// environment variable of a field is `LACUNA_` and its name in upper case (`LACUNA_MAX_BATCH`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// A GGUF file or a Hugging Face directory.
    pub model: Option<PathBuf>,
    /// The name clients pass as `model` (default: the model file's or directory's stem).
    pub served_model_name: Option<String>,
    pub backend: Backend,
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// A file holding the API key; requests to `/v1/*` must then send `Authorization: Bearer KEY`.
    pub api_key_file: Option<PathBuf>,
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; more are refused with 429.
    pub max_queue: usize,
    /// Most tokens (prompt plus completion) of one sequence (default: the model's context).
    pub max_context: Option<usize>,
    /// How the KV cache stores keys and values: `f16` (default; half the bytes attention reads
    /// per token and half the memory per sequence) or `f32` (exact).
    pub kv_cache: KvDtype,
    /// Most prompt tokens prefilled between two decode steps.
    pub prefill_chunk: usize,
    /// Run the logits on a W8A8 copy of the output projection (rows rounded to INT8 at load, the
    /// hidden states quantized per token): a quarter of the head's bytes per token, logits that
    /// move a little (see docs/quantization.md).
    pub int8_lm_head: bool,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub grace_seconds: u64,
    /// HTTP worker threads (the model runs on its own thread and the kernels' pool).
    pub http_workers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: None,
            served_model_name: None,
            backend: Backend::Cpu,
            host: "0.0.0.0".into(),
            port: 8000,
            api_key_file: None,
            max_batch: 32,
            max_queue: 256,
            max_context: None,
            kv_cache: KvDtype::F16,
            prefill_chunk: 256,
            int8_lm_head: false,
            max_body_bytes: 4 << 20,
            grace_seconds: 30,
            http_workers: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("{var}={value:?}: {msg}")]
    Env { var: String, value: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

impl Settings {
    /// Defaults, overridden by `file` (YAML, any subset of the fields) when given, overridden by
    /// the process environment.
    pub fn layered(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut s = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        s.apply_env(std::env::vars())?;
        Ok(s)
    }

    pub fn from_file(path: &Path) -> Result<Self, SettingsError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| SettingsError::Read { path: path.to_path_buf(), source })?;
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_saphyr::from_str(&text).map_err(|e| SettingsError::File { path: path.to_path_buf(), msg: e.to_string() })
    }

    /// Applies the `LACUNA_*` variables among `vars` that name a field; others are left alone
    /// (`LACUNA_THREADS` and `LACUNA_CACHE` belong to the rest of Lacuna).
    pub fn apply_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) -> Result<(), SettingsError> {
        for (var, value) in vars {
            let Some(key) = var.strip_prefix("LACUNA_") else { continue };
            let err = |msg: String| SettingsError::Env { var: var.clone(), value: value.clone(), msg };
            match key {
                "MODEL" => self.model = Some(PathBuf::from(&value)),
                "SERVED_MODEL_NAME" => self.served_model_name = Some(value.clone()),
                "BACKEND" => self.backend = value.parse().map_err(err)?,
                "HOST" => self.host = value.clone(),
                "PORT" => self.port = parse(&value).map_err(err)?,
                "API_KEY_FILE" => self.api_key_file = Some(PathBuf::from(&value)),
                "MAX_BATCH" => self.max_batch = parse(&value).map_err(err)?,
                "MAX_QUEUE" => self.max_queue = parse(&value).map_err(err)?,
                "MAX_CONTEXT" => self.max_context = Some(parse(&value).map_err(err)?),
                "KV_CACHE" => self.kv_cache = value.parse().map_err(|e: lacuna_model::Error| err(e.to_string()))?,
                "PREFILL_CHUNK" => self.prefill_chunk = parse(&value).map_err(err)?,
                "INT8_LM_HEAD" => self.int8_lm_head = parse(&value).map_err(err)?,
                "MAX_BODY_BYTES" => self.max_body_bytes = parse(&value).map_err(err)?,
                "GRACE_SECONDS" => self.grace_seconds = parse(&value).map_err(err)?,
                "HTTP_WORKERS" => self.http_workers = parse(&value).map_err(err)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Checks what must hold before anything is loaded or bound.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let positive = [
            ("max_batch", self.max_batch),
            ("max_queue", self.max_queue),
            ("prefill_chunk", self.prefill_chunk),
            ("max_body_bytes", self.max_body_bytes),
            ("http_workers", self.http_workers),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(SettingsError::Invalid(format!("{name} must be at least 1")));
        }
        if self.max_context == Some(0) {
            return Err(SettingsError::Invalid("max_context must be at least 1".into()));
        }
        if self.model.is_none() {
            return Err(SettingsError::Invalid(
                "no model given (--model, LACUNA_MODEL or `model:` in the file)".into(),
            ));
        }
        Ok(())
    }
}

fn parse<T: FromStr>(v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse().map_err(|e: T::Err| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.yaml");
        std::fs::write(&path, "port: 9000\nmax_batch: 8\nserved_model_name: tiny\n").unwrap();
        let mut s = Settings::from_file(&path).unwrap();
        assert_eq!((s.port, s.max_batch, s.max_queue), (9000, 8, Settings::default().max_queue));
        s.apply_env([
            ("LACUNA_MAX_BATCH".to_owned(), "4".to_owned()),
            ("LACUNA_THREADS".to_owned(), "3".to_owned()),
            ("LACUNA_INT8_LM_HEAD".to_owned(), "true".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ])
        .unwrap();
        assert_eq!((s.port, s.max_batch), (9000, 4));
        assert!(s.int8_lm_head && !Settings::default().int8_lm_head);
        assert_eq!(s.served_model_name.as_deref(), Some("tiny"));
    }

    #[test]
    fn bad_values_name_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.yaml");
        std::fs::write(&path, "max_bach: 8\n").unwrap();
        let e = Settings::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("serve.yaml") && e.contains("max_bach"), "{e}");
        let e = Settings::default().apply_env([("LACUNA_PORT".to_owned(), "eighty".to_owned())]).unwrap_err();
        assert!(e.to_string().contains("LACUNA_PORT"), "{e}");
        let s = Settings { model: Some("m.gguf".into()), max_batch: 0, ..Settings::default() };
        assert!(s.validate().unwrap_err().to_string().contains("max_batch"));
        assert!(Settings::default().validate().unwrap_err().to_string().contains("no model"));
    }
}

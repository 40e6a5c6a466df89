//! OpenAI's request and response shapes (the subset Lacuna serves) and the checks that turn a
//! request's parameters into a generation, naming the parameter at fault.

use lacuna_model::chat::ChatMessage;
use lacuna_model::sampling::{Penalties, SamplingParams};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// Most stop strings, top log-probabilities and choices a request may ask for.
const MAX_STOP: usize = 16;
const MAX_LOGPROBS: i64 = 20;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A request to `/v1/completions` (`prompt`) or `/v1/chat/completions` (`messages`): one struct,
/// no `flatten`, so that a wrong field is reported by its own name. Unknown fields are ignored, as
/// OpenAI's clients send some (`user`) that do not affect generation.
#[derive(Debug, Default, Deserialize)]
pub struct Request {
    pub model: String,
    pub prompt: Option<Prompt>,
    pub messages: Option<Vec<InMessage>>,
    pub echo: Option<bool>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Completions: an integer (alternatives per token); chat: a boolean.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    /// vLLM's extension: keep generating past EOS (benchmarks, fixed-length tests).
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// Parses a body: malformed JSON is a bad request, a wrong field is an invalid parameter named by
/// its path (`messages[0].content`).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::BadRequest("the body must be a JSON object".into()));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // A missing field is reported at its parent's path; name the field itself.
        let param = match inner.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            Some(field) => field.to_owned(),
            None if path == "." => "body".to_owned(),
            None => path,
        };
        ApiError::param(&param, format!("{param}: {inner}"))
    })
}

/// A request's generation settings after validation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub sampling: SamplingParams,
    pub penalties: Penalties,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

impl Request {
    /// The settings both endpoints share (`max_completion_tokens` wins over `max_tokens`).
    pub fn validate(&self, max_batch: usize) -> Result<Generation, ApiError> {
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(m) if m >= 1 => Some(m as usize),
            Some(m) => return Err(ApiError::param("max_tokens", format!("max_tokens must be at least 1, got {m}"))),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::param("temperature", format!("temperature must be in [0, 2], got {temperature}")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::param("top_p", format!("top_p must be in (0, 1], got {top_p}")));
        }
        let top_k = match self.top_k.unwrap_or(0) {
            -1 | 0 => 0,
            k if k > 0 => k as usize,
            k => return Err(ApiError::param("top_k", format!("top_k must be -1, 0 (off) or positive, got {k}"))),
        };
        let n = self.n.unwrap_or(1);
        if n < 1 || n as usize > max_batch {
            return Err(ApiError::param("n", format!("n must be in [1, {max_batch}], got {n}")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::param("stop", format!("at most {MAX_STOP} stop strings, got {}", stop.len())));
        }
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let penalties = Penalties {
            presence: self.presence_penalty.unwrap_or(0.0),
            frequency: self.frequency_penalty.unwrap_or(0.0),
        };
        for (name, v) in [("presence_penalty", penalties.presence), ("frequency_penalty", penalties.frequency)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::param(name, format!("{name} must be in [-2, 2], got {v}")));
            }
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            None => rand::random(),
        };
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::param("stream_options", "stream_options needs stream: true"));
        }
        Ok(Generation {
            max_tokens,
            n: n as usize,
            sampling: SamplingParams { temperature, top_p, top_k, seed },
            penalties,
            stop,
            stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

/// The completions endpoint's `logprobs`: how many alternatives per token, when asked.
pub fn completion_logprobs(v: &Option<Value>) -> Result<Option<usize>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(k)) => match k.as_i64() {
            Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
            _ => {
                Err(ApiError::param("logprobs", format!("logprobs must be an integer in [0, {MAX_LOGPROBS}], got {k}")))
            }
        },
        Some(other) => Err(ApiError::param("logprobs", format!("logprobs must be an integer, got {other}"))),
    }
}

/// The chat endpoint's `logprobs` / `top_logprobs`.
pub fn chat_logprobs(logprobs: &Option<Value>, top: Option<i64>) -> Result<Option<usize>, ApiError> {
    let on = match logprobs {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(ApiError::param("logprobs", format!("logprobs must be a boolean, got {other}"))),
    };
    match (on, top) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(ApiError::param("top_logprobs", "top_logprobs needs logprobs: true")),
        (true, None) => Ok(Some(0)),
        (true, Some(k)) if (0..=MAX_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
        (true, Some(k)) => {
            Err(ApiError::param("top_logprobs", format!("top_logprobs must be in [0, {MAX_LOGPROBS}], got {k}")))
        }
    }
}

/// Chat messages in the shape the template wants; text parts of a content array are joined.
pub fn chat_messages(messages: &[InMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut out = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => out.push_str(t),
                            _ => {
                                return Err(ApiError::param(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!("only text content parts are supported, got type {:?}", p.kind),
                                ));
                            }
                        }
                    }
                    out
                }
            };
            Ok(ChatMessage::new(m.role.clone(), content))
        })
        .collect()
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_fields_are_named() {
        let e = parse::<Request>(br#"{"model":"m","prompt":"hi","temperature":"hot"}"#).unwrap_err();
        assert!(matches!(&e, ApiError::InvalidParameter { param, .. } if param == "temperature"), "{e:?}");
        let e = parse::<Request>(br#"{"prompt":"hi"}"#).unwrap_err();
        assert!(matches!(&e, ApiError::InvalidParameter { param, .. } if param == "model"), "{e:?}");
        let e = parse::<Request>(br#"{"model":"m","messages":[{"role":"user","content":7}]}"#).unwrap_err();
        assert!(matches!(&e, ApiError::InvalidParameter { param, .. } if param.starts_with("messages[0]")), "{e:?}");
        assert!(matches!(parse::<Request>(b"{not json"), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn ranges_are_checked() {
        let c = Request { temperature: Some(3.0), ..Default::default() };
        assert!(matches!(c.validate(8), Err(ApiError::InvalidParameter { param, .. }) if param == "temperature"));
        let c = Request { n: Some(9), ..Default::default() };
        assert!(matches!(c.validate(8), Err(ApiError::InvalidParameter { param, .. }) if param == "n"));
        let c = Request {
            top_k: Some(-1),
            seed: Some(5),
            max_tokens: Some(9),
            max_completion_tokens: Some(3),
            ..Default::default()
        };
        let g = c.validate(8).unwrap();
        assert_eq!((g.sampling.top_k, g.sampling.seed, g.max_tokens), (0, 5, Some(3)));
        assert!(chat_logprobs(&None, Some(2)).is_err());
        assert_eq!(chat_logprobs(&Some(Value::Bool(true)), Some(2)).unwrap(), Some(2));
        assert!(completion_logprobs(&Some(serde_json::json!(21))).is_err());
        assert!(completion_logprobs(&Some(serde_json::json!(true))).is_err());
    }
}

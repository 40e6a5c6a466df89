//! Chat templates rendered with minijinja (Python-compatible methods enabled), from the checkpoint.
//!
//! The environment mirrors the one transformers' `apply_chat_template` uses: `trim_blocks` and
//! `lstrip_blocks` on, Python string/dict methods (`.strip()`, `.startswith()`, `.items()`...),
//! `raise_exception(msg)` and a `tojson` that writes JSON the way Python's `json.dumps` does.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, context};

use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the BOS/EOS strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; a syntax error is an [`Error::ChatTemplate`].
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string()).map_err(|e| Error::ChatTemplate(format!("{e:#}")))?;
        Ok(ChatTemplate { env, bos_token: bos_token.map(str::to_string), eos_token: eos_token.map(str::to_string) })
    }

    /// The template a tokenizer carries; an error if it has none.
    pub fn from_tokenizer(tok: &crate::tokenizer::Tokenizer) -> Result<Self> {
        let source =
            tok.chat_template().ok_or_else(|| Error::ChatTemplate("the tokenizer has no chat template".into()))?;
        Self::new(source, tok.bos_token(), tok.eos_token())
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| Error::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::ChatTemplate(format!("{e:#}")))
    }
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' chat environment has it:
/// `", "`/`": "` separators without indent, keys in insertion order.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let (item_sep, key_sep) = if indent.is_some() { (",", ": ") } else { (", ", ": ") };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                out.push_str(&i.to_string());
            } else if let Ok(f) = f64::try_from(v.clone()) {
                // Python writes floats with a fractional part ("1.0") and its names for non-finite ones.
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&format!("{f:?}"));
                }
            } else {
                out.push_str(&v.to_string());
            }
        }
        ValueKind::String => out.push_str(&json_string(v.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let k = key.as_str().map(str::to_string).unwrap_or_else(|| key.to_string());
                out.push_str(&json_string(&k));
                out.push_str(key_sep);
                write_json(&v.get_item(key)?, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => out.push_str(&json_string(&v.to_string())),
    }
    Ok(())
}

fn json_string(s: &str) -> String {
    // serde_json escapes exactly what Python's json does with ensure_ascii=False.
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msgs() -> Vec<ChatMessage> {
        vec![ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi!")]
    }

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>")).unwrap();
        let base = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n";
        assert_eq!(t.render(&msgs(), false).unwrap(), base);
        assert_eq!(t.render(&msgs(), true).unwrap(), format!("{base}<|im_start|>assistant\n"));
    }

    #[test]
    fn python_methods_blocks_and_bos() {
        // Llama-2 style: bos_token variable, .strip(), raise_exception, trim/lstrip blocks.
        let src = "{% for m in messages %}\n  {% if m['role'] == 'user' %}\n{{ bos_token }}[INST] {{ m['content'].strip() }} [/INST]\n  {% elif m['role'] == 'assistant' %}\n{{ m['content'] }}{{ eos_token }}\n  {% else %}\n{{ raise_exception('bad role ' + m['role']) }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).unwrap();
        let m = vec![ChatMessage::new("user", "  hi  "), ChatMessage::new("assistant", "yo")];
        assert_eq!(t.render(&m, false).unwrap(), "<s>[INST] hi [/INST]\nyo</s>\n");
        let err = t.render(&[ChatMessage::new("tool", "x")], false).unwrap_err();
        assert!(err.to_string().contains("bad role tool"), "{err}");
    }

    #[test]
    fn tojson_like_python() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ [1, 2.5, none, true, 'é\"'] | tojson(indent=2) }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs(), false).unwrap(),
            "{\"role\": \"system\", \"content\": \"Be brief.\"}|[\n  1,\n  2.5,\n  null,\n  true,\n  \"é\\\"\"\n]"
        );
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(matches!(ChatTemplate::new("{% for %}", None, None), Err(Error::ChatTemplate(_))));
    }
}

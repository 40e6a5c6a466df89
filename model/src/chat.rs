//! Chat templates rendered with minijinja (Python-compatible methods enabled), from the checkpoint.
//!
//! OWNER: helper B. Interface (keep these signatures):
//!
//! ```ignore
//! #[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
//! pub struct ChatMessage { pub role: String, pub content: String }
//! pub struct ChatTemplate { /* compiled template + bos/eos token strings */ }
//! impl ChatTemplate {
//!     pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> crate::Result<Self>;
//!     pub fn from_tokenizer(tok: &crate::tokenizer::Tokenizer) -> crate::Result<Self>; // Error if it has none
//!     pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> crate::Result<String>;
//! }
//! ```

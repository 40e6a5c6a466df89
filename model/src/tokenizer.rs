//! Tokenizers: from `tokenizer.json` (Hugging Face) and from GGUF metadata (GPT-2 byte-level BPE as in
//! SmolLM2, SentencePiece-style BPE as in Llama-2), with special tokens and BOS/EOS handling.
//!
//! OWNER: helper B. Interface (keep these signatures):
//!
//! ```ignore
//! pub struct Tokenizer { /* tokenizers::Tokenizer + special ids + add_bos + chat template */ }
//! impl Tokenizer {
//!     pub fn from_gguf(file: &crate::gguf::GgufFile) -> crate::Result<Self>;
//!     /// tokenizer.json plus tokenizer_config.json (chat_template, bos/eos tokens, add_bos_token)
//!     /// and generation_config.json (eos_token_id, possibly a list) when present.
//!     pub fn from_hf_dir(dir: &Path) -> crate::Result<Self>;
//!     /// Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json that HF
//!     /// transformers' AutoTokenizer loads to the same ids.
//!     pub fn save_hf(&self, dir: &Path) -> crate::Result<()>;
//!     pub fn encode(&self, text: &str, add_special_tokens: bool) -> crate::Result<Vec<u32>>; // adds BOS iff add_special_tokens && add_bos
//!     pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> crate::Result<String>;
//!     pub fn vocab_size(&self) -> usize;
//!     pub fn bos_id(&self) -> Option<u32>;
//!     pub fn eos_ids(&self) -> &[u32];     // every id that ends generation
//!     pub fn token_to_id(&self, token: &str) -> Option<u32>;
//!     pub fn id_to_token(&self, id: u32) -> Option<String>;
//!     pub fn chat_template(&self) -> Option<&str>;
//!     pub fn bos_token(&self) -> Option<&str>;  pub fn eos_token(&self) -> Option<&str>;
//! }
//! /// Incremental detokenizer for streaming: feed ids, get the newly completed text (never a broken UTF-8 char).
//! pub struct DecodeStream<'a> { .. }  impl<'a> DecodeStream<'a> { pub fn new(tok: &'a Tokenizer) -> Self; pub fn push(&mut self, id: u32) -> crate::Result<String>; }
//! ```

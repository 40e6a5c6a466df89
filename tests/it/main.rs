mod gguf;
mod tokenizer;

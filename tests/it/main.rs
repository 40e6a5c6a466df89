
mod tokenizer;

//! SmolLM2's GGUF tokenizer against transformers' conversion of the same file
//! (`tests/fixtures/make_tokenizer_fixture.py`), and the Hugging Face directory round trip.

use lacuna_model::chat::{ChatMessage, ChatTemplate};
use lacuna_model::gguf::GgufFile;
use lacuna_model::tokenizer::{DecodeStream, Tokenizer};

#[derive(serde::Deserialize)]
struct Fixture {
    vocab_size: usize,
    bos_token: String,
    eos_token: String,
    samples: Vec<Sample>,
    chats: Vec<Chat>,
}

#[derive(serde::Deserialize)]
struct Sample {
    text: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
}

fn fixture() -> Fixture {
    let path = lacuna_tests::fixtures_dir().join("tokenizer_smollm2.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn smollm2() -> Tokenizer {
    let gguf = GgufFile::open(lacuna_tests::smollm2_gguf()).expect("open SmolLM2 GGUF");
    Tokenizer::from_gguf(&gguf).expect("tokenizer from GGUF")
}

/// Every sample whose ids differ from the reference, with both id lists.
fn mismatches(tok: &Tokenizer, fx: &Fixture) -> Vec<String> {
    fx.samples
        .iter()
        .filter_map(|s| {
            let got = tok.encode(&s.text, true).expect("encode");
            (got != s.ids).then(|| format!("{:?}: got {got:?}, reference {:?}", s.text, s.ids))
        })
        .collect()
}

#[test]
fn gguf_ids_match_reference() {
    let fx = fixture();
    assert!(fx.samples.len() >= 30);
    let tok = smollm2();
    let bad = mismatches(&tok, &fx);
    assert!(bad.is_empty(), "{} of {} samples differ:\n{}", bad.len(), fx.samples.len(), bad.join("\n"));
    assert_eq!(tok.vocab_size(), fx.vocab_size);
}

#[test]
fn the_is_one_token() {
    let fx = fixture();
    let reference = &fx.samples.iter().find(|s| s.text == "The").expect("\"The\" sample").ids;
    assert_eq!(reference.len(), 1);
    assert_eq!(smollm2().encode("The", true).unwrap(), *reference);
}

#[test]
fn special_tokens_and_flags() {
    let fx = fixture();
    let tok = smollm2();
    assert_eq!(tok.bos_token(), Some(fx.bos_token.as_str()));
    assert_eq!(tok.eos_token(), Some(fx.eos_token.as_str()));
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert!(tok.eos_ids().contains(&im_end));
    assert_eq!(tok.bos_id(), tok.token_to_id("<|im_start|>"));
    // SmolLM2 adds no BOS: with and without special tokens give the same ids.
    assert_eq!(tok.encode("hi there", true).unwrap(), tok.encode("hi there", false).unwrap());
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![tok.bos_id().unwrap()]);
}

#[test]
fn decode_round_trips() {
    let fx = fixture();
    let tok = smollm2();
    for s in &fx.samples {
        let ids = tok.encode(&s.text, true).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s.text, "decode(encode({:?}))", s.text);
        // Streaming gives the same text as a whole decode (special tokens skipped), piece by piece.
        let mut stream = DecodeStream::new(&tok);
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&stream.push(id).unwrap());
        }
        assert_eq!(streamed, tok.decode(&ids, true).unwrap(), "streamed {:?}", s.text);
    }
}

#[test]
fn hf_dir_round_trip() {
    let fx = fixture();
    let tok = smollm2();
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf(dir.path()).unwrap();
    // For tests/fixtures/check_hf_tokenizer.py, which loads the directory with transformers.
    if let Some(keep) = std::env::var_os("LACUNA_TOKENIZER_SAVE_DIR") {
        tok.save_hf(std::path::Path::new(&keep)).unwrap();
    }
    let back = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let bad = mismatches(&back, &fx);
    assert!(bad.is_empty(), "{} samples differ after save_hf/from_hf_dir:\n{}", bad.len(), bad.join("\n"));
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.bos_id(), tok.bos_id());
    assert_eq!(back.eos_ids(), tok.eos_ids());
    assert_eq!(back.chat_template(), tok.chat_template());
    assert_eq!(back.model_max_length(), Some(8192));
}

#[test]
fn chat_renders_match_reference() {
    let fx = fixture();
    let tok = smollm2();
    let template = ChatTemplate::from_tokenizer(&tok).unwrap();
    for c in &fx.chats {
        let got = template.render(&c.messages, c.add_generation_prompt).unwrap();
        assert_eq!(got, c.rendered, "messages {:?}, add_generation_prompt {}", c.messages, c.add_generation_prompt);
    }
    // The rendered prompt tokenizes with the turn markers as single ids.
    let prompt = template.render(&fx.chats[0].messages, true).unwrap();
    let ids = tok.encode(&prompt, true).unwrap();
    assert_eq!(ids.first().copied(), tok.token_to_id("<|im_start|>"));
}

#[derive(serde::Deserialize)]
struct SpmFixture {
    vocab_size: usize,
    samples: Vec<Sample>,
}

/// A Llama-2-style vocabulary (SentencePiece BPE with byte fallback, no merges in the file)
/// against SentencePiece's own encoding (`tests/fixtures/make_spm_tokenizer_fixture.py`).
#[test]
fn tiny_spm_gguf_matches_sentencepiece() {
    let dir = lacuna_tests::fixtures_dir();
    let text = std::fs::read_to_string(dir.join("tokenizer_tiny_spm.json")).unwrap();
    let fx: SpmFixture = serde_json::from_str(&text).unwrap();
    let gguf = GgufFile::open(dir.join("tiny_spm.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(tok.vocab_size(), fx.vocab_size);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.model_max_length(), Some(64));
    let mut bad = Vec::new();
    for s in &fx.samples {
        let got = tok.encode(&s.text, true).unwrap();
        if got != s.ids {
            bad.push(format!("{:?}: got {got:?}, sentencepiece {:?}", s.text, s.ids));
        }
        assert_eq!(tok.decode(&got, true).unwrap(), s.text, "decode(encode({:?}))", s.text);
    }
    assert!(bad.is_empty(), "{} samples differ:\n{}", bad.len(), bad.join("\n"));
}

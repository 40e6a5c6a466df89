//! Validation of documents against a CRD's `openAPIV3Schema` with the apiserver's semantics
//! (OpenAPI v3.0 keywords, `nullable`, `x-kubernetes-int-or-string`, unknown fields refused as
//! `kubectl --validate=strict` does), and the structural-schema rules Kubernetes imposes on the
//! schema itself.

use serde_json::Value;

/// One violation, at a dotted path (`spec.pruning.sparsity`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", if self.path.is_empty() { "<root>" } else { &self.path }, self.message)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Every violation of `value` against `schema` (empty when valid).
pub fn validate(schema: &Value, value: &Value) -> Vec<Violation> {
    let mut out = Vec::new();
    check(schema, value, "", &mut out);
    out
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check(schema: &Value, value: &Value, path: &str, out: &mut Vec<Violation>) {
    let mut bad = |msg: String| out.push(Violation { path: path.to_owned(), message: msg });
    if value.is_null() {
        if !flag(schema, "nullable") {
            bad("must not be null".into());
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !matches!(type_name(value), "integer" | "string") {
            bad(format!("must be an integer or a string, not {}", type_name(value)));
        }
        return;
    }
    let actual = type_name(value);
    if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let ok = expected == actual || (expected == "number" && actual == "integer");
        if !ok {
            bad(format!("must be {expected}, not {actual}"));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let list: Vec<String> = options.iter().map(|o| o.to_string()).collect();
        bad(format!("{value} is not one of {}", list.join(", ")));
    }
    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                let excl = flag(schema, "exclusiveMinimum");
                if x < min || (excl && x == min) {
                    bad(format!("{x} is below the minimum {min}{}", if excl { " (exclusive)" } else { "" }));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                let excl = flag(schema, "exclusiveMaximum");
                if x > max || (excl && x == max) {
                    bad(format!("{x} is above the maximum {max}{}", if excl { " (exclusive)" } else { "" }));
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                bad(format!("shorter than {min} characters"));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                bad(format!("longer than {max} characters"));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(p) {
                    Ok(re) if !re.is_match(s) => bad(format!("{s:?} does not match {p}")),
                    Ok(_) => {}
                    Err(e) => bad(format!("the schema's pattern {p:?} is invalid: {e}")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                bad(format!("has fewer than {min} items"));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && (items.len() as u64) > max
            {
                bad(format!("has more than {max} items"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::Object(map) => {
            let n = map.len() as u64;
            if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
                && n < min
            {
                bad(format!("has {n} fields, at least {min} needed"));
            }
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && n > max
            {
                let keys: Vec<&str> = map.keys().map(String::as_str).collect();
                bad(format!("has {n} fields ({}), at most {max} allowed", keys.join(", ")));
            }
            for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if let Some(r) = req.as_str()
                    && !map.contains_key(r)
                {
                    out.push(Violation { path: join(path, r), message: "required field is missing".into() });
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            for (k, v) in map {
                let p = join(path, k);
                match (props.and_then(|ps| ps.get(k)), additional) {
                    (Some(s), _) => check(s, v, &p, out),
                    (None, Some(s)) if s.is_object() => check(s, v, &p, out),
                    (None, Some(Value::Bool(true))) => {}
                    (None, _) if preserve => {}
                    // The root's type fields and metadata (an ObjectMeta) are the apiserver's to check.
                    (None, _) if path == "metadata" => {}
                    (None, _) if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") => {}
                    (None, _) => out.push(Violation { path: p, message: "unknown field".into() }),
                }
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
    for sub in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        check(sub, value, path, out);
    }
    for (key, exactly_one) in [("anyOf", false), ("oneOf", true)] {
        if let Some(subs) = schema.get(key).and_then(Value::as_array) {
            let passing = subs.iter().filter(|s| validate_in_place(s, value)).count();
            if passing == 0 || (exactly_one && passing > 1) {
                out.push(Violation {
                    path: path.to_owned(),
                    message: format!("matches {passing} of the {key} alternatives"),
                });
            }
        }
    }
}

/// Whether `value` meets a junctor branch (whose unknown-field rule is the enclosing schema's).
fn validate_in_place(schema: &Value, value: &Value) -> bool {
    let mut out = Vec::new();
    check(schema, value, "", &mut out);
    out.iter().all(|v| v.message == "unknown field")
}

/// Violations of the structural-schema rules (empty when the schema is structural).
pub fn structural_violations(schema: &Value) -> Vec<Violation> {
    let mut out = Vec::new();
    structural(schema, "", false, &mut out);
    out
}

fn structural(schema: &Value, path: &str, in_junctor: bool, out: &mut Vec<Violation>) {
    let Some(obj) = schema.as_object() else {
        out.push(Violation { path: path.into(), message: "a schema must be an object".into() });
        return;
    };
    let mut bad = |m: &str| out.push(Violation { path: path.into(), message: m.into() });
    for forbidden in ["$ref", "definitions", "$schema", "id"] {
        if obj.contains_key(forbidden) {
            bad(&format!("`{forbidden}` is not allowed"));
        }
    }
    let open = flag(schema, "x-kubernetes-int-or-string") || flag(schema, "x-kubernetes-preserve-unknown-fields");
    if in_junctor {
        for k in ["type", "description", "default", "nullable", "additionalProperties"] {
            if obj.contains_key(k) {
                bad(&format!("`{k}` is not allowed inside allOf/anyOf/oneOf/not"));
            }
        }
        if obj.keys().any(|k| k.starts_with("x-kubernetes-") && k != "x-kubernetes-validations") {
            bad("x-kubernetes-* extensions are not allowed inside allOf/anyOf/oneOf/not");
        }
    } else if !open && obj.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
        bad("every schema needs a `type`");
    }
    if let Some(t) = obj.get("type")
        && !t.is_string()
    {
        bad("`type` must be one string (use nullable for null)");
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        bad("`properties` and `additionalProperties` are mutually exclusive");
    }
    if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
        bad("`additionalProperties: false` is not allowed");
    }
    if obj.get("items").is_some_and(Value::is_array) {
        bad("`items` must be one schema");
    }
    for (k, v) in obj.get("properties").and_then(Value::as_object).into_iter().flatten() {
        structural(v, &join(path, k), in_junctor, out);
    }
    if let Some(v) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        structural(v, &join(path, "*"), in_junctor, out);
    }
    if let Some(v) = obj.get("items").filter(|v| v.is_object()) {
        structural(v, &format!("{path}[]"), in_junctor, out);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for (i, v) in obj.get(key).and_then(Value::as_array).into_iter().flatten().enumerate() {
            structural(v, &format!("{path}.{key}[{i}]"), true, out);
        }
    }
    if let Some(v) = obj.get("not") {
        structural(v, &format!("{path}.not"), true, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ranges_enums_unknown_fields_and_cardinality_are_refused_with_the_path() {
        let s = json!({"type": "object", "properties": {
            "x": {"type": "number", "minimum": 0.0, "maximum": 1.0, "exclusiveMaximum": true},
            "m": {"type": "string", "enum": ["a", "b"]},
            "one": {"type": "object", "maxProperties": 1, "properties": {"p": {"type": "string"}, "q": {"type": "string"}}},
            "q": {"type": "object", "additionalProperties": {"x-kubernetes-int-or-string": true}}
        }, "required": ["m"]});
        assert!(validate(&s, &json!({"x": 0.5, "m": "a", "q": {"cpu": "2", "gpu": 1}})).is_empty());
        let v = validate(&s, &json!({"x": 1.0, "m": "c", "one": {"p": "1", "q": "2"}, "zz": 1, "q": {"a": true}}));
        let paths: Vec<&str> = v.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(paths, ["m", "one", "q.a", "x", "zz"], "{v:?}");
        assert_eq!(validate(&s, &json!({}))[0].to_string(), "m: required field is missing");
    }

    #[test]
    fn structural_rules() {
        assert!(structural_violations(&json!({"type": "object", "properties": {"a": {"type": "string"}}})).is_empty());
        let v = structural_violations(&json!({"type": "object", "additionalProperties": false,
            "properties": {"a": {"anyOf": [{"type": "string"}]}, "b": {"type": ["string", "null"]}}}));
        assert_eq!(v.len(), 6, "{v:?}");
    }
}

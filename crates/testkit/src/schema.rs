//! Checks `--json` documents against the committed JSON schemas (`docs/schema/`, generated
//! from `vmbackup::contract`): every document a test parses with `cli::parse_one_document` is
//! checked against its command's schema, strictly (a field the schema does not name is an
//! error). With `VMBACKUP_SCHEMA_SEEN=DIR`, the schema file of each checked document is
//! touched in DIR, so that `scripts/test` can tell which commands' documents no test read
//! (and the first document of each command that succeeded and that failed is kept beside it,
//! `NAME.json.ok` and `NAME.json.failed`).
//!
//! The keywords the generated schemas use (a subset of JSON Schema 2020-12) are understood:
//! `$ref` to `#/$defs/...`, `type` (one or several), `properties`, `required`,
//! `additionalProperties`, `items`, `enum`, `const`, `anyOf`, `oneOf`, `allOf`, `minimum`;
//! `format`, `description`, `default` and `title` are annotations. Any other keyword is an
//! error, so that a schema this cannot check is not passed silently.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The folder of the committed schemas.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/schema")
}

/// Checks `doc` against the schema of the command it names (`command`); a document whose
/// command is empty (the arguments did not parse) is checked as a failure document.
pub fn check_document(doc: &Value) -> Result<(), String> {
    let command = doc
        .get("command")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("document without a `command` string: {doc}"))?;
    let name = if command.is_empty() { "init" } else { command };
    let file = format!("{}.json", name.replace(' ', "-"));
    let path = dir().join(&file);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "no schema for command {command:?} ({}): {e}",
            path.display()
        )
    })?;
    let schema: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    validate(&schema, doc).map_err(|errs| {
        format!(
            "the {command:?} document does not match {}:\n  {}\ndocument: {doc}",
            path.display(),
            errs.join("\n  ")
        )
    })?;
    if let Some(seen) = std::env::var_os("VMBACKUP_SCHEMA_SEEN") {
        let seen = PathBuf::from(seen);
        let _ = std::fs::create_dir_all(&seen);
        // The first document of each command and outcome is kept (a source of examples for
        // docs/JSON.md).
        let ok = doc.get("ok") == Some(&Value::Bool(true));
        let keep = seen.join(format!("{}.{}", file, if ok { "ok" } else { "failed" }));
        if !keep.exists() {
            let _ = std::fs::write(&keep, serde_json::to_string_pretty(doc).unwrap_or_default());
        }
        let _ = std::fs::write(seen.join(&file), b"");
    }
    Ok(())
}

/// Validates `value` against `schema` (a whole schema, with its `$defs`).
pub fn validate(schema: &Value, value: &Value) -> Result<(), Vec<String>> {
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut errors = Vec::new();
    check(&defs, schema, value, "$", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$defs",
    "title",
    "description",
    "format",
    "default",
    "examples",
];

/// The keywords that constrain a value, all checked below.
const KEYWORDS: &[&str] = &[
    "$ref",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "minimum",
    "maximum",
];

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        _ => false,
    }
}

fn check(defs: &Map<String, Value>, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let s = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => return errs.push(format!("{at}: nothing is allowed here")),
        Value::Object(s) => s,
        _ => return errs.push(format!("{at}: the schema is not an object")),
    };
    for key in s.keys() {
        if !ANNOTATIONS.contains(&key.as_str()) && !KEYWORDS.contains(&key.as_str()) {
            errs.push(format!("{at}: schema keyword {key:?} is not understood"));
        }
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        match r.strip_prefix("#/$defs/").and_then(|n| defs.get(n)) {
            Some(d) => check(defs, d, v, at, errs),
            None => errs.push(format!("{at}: unresolvable $ref {r}")),
        }
    }
    if let Some(t) = s.get("type") {
        let ok = match t {
            Value::String(t) => type_matches(t, v),
            Value::Array(ts) => ts
                .iter()
                .filter_map(Value::as_str)
                .any(|t| type_matches(t, v)),
            _ => false,
        };
        if !ok {
            errs.push(format!("{at}: {v} is not of type {t}"));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!(
                "{at}: {v} is not one of {}",
                Value::from(e.clone())
            ));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            errs.push(format!("{at}: {v} is not {c}"));
        }
    }
    if let (Some(m), Some(n)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < m {
            errs.push(format!("{at}: {n} is below the minimum {m}"));
        }
    }
    if let (Some(m), Some(n)) = (s.get("maximum").and_then(Value::as_f64), v.as_f64()) {
        if n > m {
            errs.push(format!("{at}: {n} is above the maximum {m}"));
        }
    }
    for (key, all) in [("allOf", true), ("anyOf", false), ("oneOf", false)] {
        let Some(subs) = s.get(key).and_then(Value::as_array) else {
            continue;
        };
        let results: Vec<Vec<String>> = subs
            .iter()
            .map(|sub| {
                let mut e = Vec::new();
                check(defs, sub, v, at, &mut e);
                e
            })
            .collect();
        let passed = results.iter().filter(|e| e.is_empty()).count();
        let ok = match key {
            "allOf" => passed == subs.len(),
            "anyOf" => passed >= 1,
            _ => passed == 1,
        };
        if !ok {
            if all || key == "anyOf" {
                // Say why each alternative failed: the nearest one is among them.
                for (i, e) in results.iter().enumerate().filter(|(_, e)| !e.is_empty()) {
                    for line in e {
                        errs.push(format!("{key}[{i}]: {line}"));
                    }
                }
            } else {
                errs.push(format!(
                    "{at}: {passed} of the oneOf alternatives match, not 1"
                ));
            }
        }
    }
    if let Value::Object(o) = v {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !o.contains_key(r) {
                    errs.push(format!("{at}: required field {r:?} is missing"));
                }
            }
        }
        let extra = s.get("additionalProperties");
        for (k, fv) in o {
            let here = format!("{at}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(ps) => check(defs, ps, fv, &here, errs),
                None => match extra {
                    Some(x) => check(defs, x, fv, &here, errs),
                    // Strict: a schema that names its fields names all of them. One that names
                    // none (a free-form object) allows any.
                    None if props.is_some() => {
                        errs.push(format!("{at}: field {k:?} is not in the schema"))
                    }
                    None => {}
                },
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (v, s.get("items")) {
        for (i, x) in items.iter().enumerate() {
            check(defs, item, x, &format!("{at}[{i}]"), errs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "$defs": {
                "Item": {
                    "type": "object",
                    "properties": {"id": {"type": "string"}, "n": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
                    "required": ["id"]
                },
                "Kind": {"type": "string", "enum": ["a", "b"]}
            },
            "anyOf": [
                {"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}, "kind": {"$ref": "#/$defs/Kind"}}, "required": ["items"]},
                {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
            ]
        })
    }

    #[test]
    fn good_documents_pass() {
        let s = schema();
        validate(
            &s,
            &json!({"items": [{"id": "x", "n": 3}, {"id": "y", "n": null}], "kind": "a"}),
        )
        .unwrap();
        validate(&s, &json!({"error": "no"})).unwrap();
    }

    #[test]
    fn bad_documents_fail_and_say_where() {
        let s = schema();
        for bad in [
            json!({"items": [{"n": 3}]}),
            json!({"items": [{"id": 3}]}),
            json!({"items": [{"id": "x", "n": -1}]}),
            json!({"items": [{"id": "x", "n": 10}]}),
            json!({"items": [{"id": "x", "extra": true}]}),
            json!({"items": [], "kind": "c"}),
            json!({"items": [], "surprise": 1}),
            json!([1]),
        ] {
            let e = validate(&s, &bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        let e = validate(&s, &json!({"items": [{"id": "x", "extra": true}]})).unwrap_err();
        assert!(
            e.iter()
                .any(|l| l.contains("$.items[0]") && l.contains("extra")),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_keywords_are_errors_not_passes() {
        let e = validate(&json!({"pattern": "^a$"}), &json!("b")).unwrap_err();
        assert!(e[0].contains("pattern"), "{e:?}");
    }

    /// docs/JSON.md's examples are real documents: each one matches its command's schema,
    /// and every command has one.
    #[test]
    fn every_example_in_json_md_matches_its_schema_and_every_command_has_one() {
        let md = std::fs::read_to_string(dir().join("../JSON.md")).unwrap();
        let mut examples = 0;
        let mut commands = std::collections::BTreeSet::new();
        let mut rest = md.as_str();
        while let Some(start) = rest.find("```json\n") {
            let body = &rest[start + 8..];
            let end = body.find("```").expect("an unclosed ```json block");
            let doc: Value = serde_json::from_str(&body[..end])
                .unwrap_or_else(|e| panic!("an example is not JSON ({e}):\n{}", &body[..end]));
            check_document(&doc).unwrap_or_else(|e| panic!("{e}"));
            commands.insert(doc["command"].as_str().unwrap().replace(' ', "-"));
            examples += 1;
            rest = &body[end + 3..];
        }
        let mut missing = Vec::new();
        for f in std::fs::read_dir(dir()).unwrap() {
            let name = f
                .unwrap()
                .file_name()
                .to_string_lossy()
                .replace(".json", "");
            if !commands.contains(&name) {
                missing.push(name);
            }
        }
        assert!(
            missing.is_empty(),
            "no example in docs/JSON.md for {missing:?}"
        );
        assert!(examples >= 30, "{examples} examples");
    }

    /// Every keyword of every schema (property names aside) is one this checks or an
    /// annotation.
    #[test]
    fn every_committed_schema_is_understood() {
        fn walk(x: &Value, path: &str, unknown: &mut Vec<String>) {
            match x {
                Value::Object(o) => {
                    for (k, v) in o {
                        if k == "properties" || k == "$defs" {
                            for (name, sub) in v.as_object().into_iter().flatten() {
                                walk(sub, &format!("{path}/{k}/{name}"), unknown);
                            }
                            continue;
                        }
                        if !KEYWORDS.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()) {
                            unknown.push(format!("{path}: {k}"));
                        }
                        if k != "enum" && k != "const" && k != "default" {
                            walk(v, &format!("{path}/{k}"), unknown);
                        }
                    }
                }
                Value::Array(a) => a.iter().for_each(|v| walk(v, path, unknown)),
                _ => {}
            }
        }
        let mut n = 0;
        let mut unknown = Vec::new();
        for f in std::fs::read_dir(dir()).unwrap() {
            let path = f.unwrap().path();
            let s: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            walk(&s, &path.display().to_string(), &mut unknown);
            n += 1;
        }
        assert!(unknown.is_empty(), "keywords not checked: {unknown:?}");
        assert!(n >= 30, "{n} schemas");
    }
}

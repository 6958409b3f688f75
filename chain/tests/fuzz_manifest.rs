//! Hostile manifests: real manifests mutated at random, byte by byte and value by value, must load or fail
//! with a clean error, never panic, and loading never writes.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::many_single_char_names)]

mod common;

use chain::{LockWait, Manifest};
use common::{TestRepo, add};
use proptest::prelude::*;
use serde_json::Value;

/// A real manifest with branches, tags and an operation record, as JSON text.
fn real_manifest(t: &TestRepo) -> String {
    let guard = t.vm.lock_exclusive(LockWait::NoWait, "fuzz").unwrap();
    let mut m: Manifest = t.vm.load().unwrap();
    let a = add(&mut m, None);
    let b = add(&mut m, Some(&a));
    let c = add(&mut m, Some(&b));
    add(&mut m, Some(&a));
    add(&mut m, Some(&c));
    m.current = Some(c);
    m.set_tag(&b, Some("weekly".into())).unwrap();
    t.vm.save(&m, &guard).unwrap();
    std::fs::read_to_string(t.vm.manifest_path()).unwrap()
}

/// Values an attacker or a broken disk might put anywhere.
fn nasty() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(Value::from(-1)),
        Just(Value::from(u64::MAX)),
        Just(Value::from(1.5)),
        Just(Value::from("")),
        Just(Value::from("../../etc/passwd")),
        Just(Value::from("/etc/passwd")),
        Just(Value::from("a/b")),
        Just(Value::from("0001")),
        Just(Value::from("\u{0}\u{ffff}")),
        Just(Value::Array(vec![])),
        Just(serde_json::json!({})),
        any::<String>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
    ]
}

/// Replaces the `n`-th scalar, array or object (in document order) with `with`.
fn replace_nth(v: &mut Value, n: &mut usize, with: &Value) -> bool {
    if *n == 0 {
        *v = with.clone();
        return true;
    }
    *n -= 1;
    match v {
        Value::Array(items) => items.iter_mut().any(|i| replace_nth(i, n, with)),
        Value::Object(map) => map.values_mut().any(|i| replace_nth(i, n, with)),
        _ => false,
    }
}

fn load_text(t: &TestRepo, text: &[u8]) {
    std::fs::write(t.vm.manifest_path(), text).unwrap();
    match t.vm.load() {
        Ok(m) => {
            // What loads is internally consistent: the tree queries work on every node.
            for node in &m.nodes {
                m.recovery_chain(&node.id).unwrap();
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // Loading never rewrote the file.
    assert_eq!(std::fs::read(t.vm.manifest_path()).unwrap(), text);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_bytes_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8)) {
        let t = TestRepo::new();
        let mut bytes = real_manifest(&t).into_bytes();
        for (at, byte, how) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] = byte,
                1 => { bytes.remove(i); }
                2 => bytes.insert(i, byte),
                _ => bytes.truncate(i),
            }
        }
        load_text(&t, &bytes);
    }

    #[test]
    fn mutated_values_never_panic(edits in prop::collection::vec((0usize..400, nasty()), 1..5)) {
        let t = TestRepo::new();
        let mut doc: Value = serde_json::from_str(&real_manifest(&t)).unwrap();
        for (n, with) in edits {
            let mut n = n;
            replace_nth(&mut doc, &mut n, &with);
        }
        load_text(&t, serde_json::to_string_pretty(&doc).unwrap().as_bytes());
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000), json_start in any::<bool>()) {
        let t = TestRepo::new();
        // Half of the time past the first byte of JSON, to reach the parser's deeper paths.
        let mut text = if json_start { b"{\"format_version\": 1, ".to_vec() } else { Vec::new() };
        text.extend_from_slice(&bytes);
        load_text(&t, &text);
    }

    #[test]
    fn numbers_at_any_size_never_panic(
        next_seq in any::<u64>(),
        lid in any::<u64>(),
        tid in any::<u64>(),
        size in any::<u64>(),
        node in 0usize..5,
    ) {
        let t = TestRepo::new();
        let mut doc: Value = serde_json::from_str(&real_manifest(&t)).unwrap();
        doc["next_seq"] = next_seq.into();
        doc["nodes"][node]["lid"] = lid.into();
        doc["nodes"][node]["tid"] = tid.into();
        doc["nodes"][node]["disks"][0]["virtual_size"] = size.into();
        load_text(&t, serde_json::to_string_pretty(&doc).unwrap().as_bytes());
    }
}

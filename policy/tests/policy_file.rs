//! The policy file: a valid file compiles to the right decisions; every error class is
//! reported with its exact `FILE:LINE:COL: message`, all of them at once.

use capgate_policy::{Decision, Matcher, PeerView, Policy};
use capgate_schema::Catalog;

const GOOD: &str = r#"[defaults]
max_message_bytes  = "4 MiB"
max_inflight_calls = 128
max_inflight_bytes = "16 MiB"
max_open_answers   = 1024
max_exports        = 10000
calls_per_second   = 2000
burst              = 200
max_connections    = 64
idle_timeout       = "5 min"

[[client]]
name  = "reader"
match = { source = "127.0.0.2/32" }
allow = ["Store.namespace", "Reader.*", "Namespace.readOnly"]
calls_per_second = 100

[[client]]
name  = "admin"
match = { unix_uid = 0 }
allow = ["*"]

[[client]]
name  = "anonymous"
match = "any"
allow = ["Store.namespace", "Namespace.get", "Namespace.list"]
"#;

fn errors(text: &str) -> Vec<String> {
    match Policy::parse("p.toml", text, Catalog::builtin()) {
        Ok(_) => panic!("policy unexpectedly valid"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn the_documented_example_compiles_to_the_right_decisions() {
    let c = Catalog::builtin();
    let p = Policy::parse("p.toml", GOOD, c).unwrap();
    let names: Vec<&str> = p.classes().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["reader", "admin", "anonymous"]);

    let reader = p.class("reader").unwrap();
    assert_eq!(reader.quotas().calls_per_second.get(), 100);
    assert_eq!(
        reader.quotas().burst.get(),
        200,
        "defaults apply where not overridden"
    );
    let get = c.method("Namespace", "get").unwrap();
    let put = c.method("Namespace", "put").unwrap();
    assert!(
        reader.allows(get),
        "Reader.* covers the inherited Namespace.get"
    );
    assert!(!reader.allows(put));
    assert_eq!(
        reader.decide(get),
        Decision::Allowed("Reader.*".into(), "p.toml:15:29".into())
    );
    assert_eq!(reader.decide(put), Decision::Denied);

    let anon = p.class("anonymous").unwrap();
    assert!(
        anon.allows(c.method("Reader", "get").unwrap()),
        "both spellings are one pair"
    );
    assert!(p.class("admin").unwrap().allows(put));

    let local2 = PeerView {
        ip: Some("127.0.0.2".parse().unwrap()),
        ..PeerView::default()
    };
    let local1 = PeerView {
        ip: Some("127.0.0.1".parse().unwrap()),
        ..PeerView::default()
    };
    let root = PeerView {
        unix_uid: Some(0),
        ..PeerView::default()
    };
    assert_eq!(p.classify(&local2).unwrap().1.name(), "reader");
    assert_eq!(p.classify(&local1).unwrap().1.name(), "anonymous");
    assert_eq!(p.classify(&root).unwrap().1.name(), "admin");
    assert_eq!(p.class("admin").unwrap().matcher(), &Matcher::UnixUid(0));
}

#[test]
fn certificate_matchers() {
    let p = Policy::parse(
        "p.toml",
        "[[client]]\nname = \"r\"\nmatch = { cert_cn = \"reader\" }\nallow = []\n\
         [[client]]\nname = \"s\"\nmatch = { cert_san = \"svc.example\" }\nallow = []\n\
         [[client]]\nname = \"k\"\nmatch = { cert_spki_sha256 = \"AB00000000000000000000000000000000000000000000000000000000000000\" }\nallow = []\n",
        Catalog::builtin(),
    )
    .unwrap();
    let cns = ["reader".to_string()];
    let sans = ["SVC.example".to_string()];
    let by_cn = PeerView {
        cert_cns: &cns,
        ..PeerView::default()
    };
    let by_san = PeerView {
        cert_sans: &sans,
        ..PeerView::default()
    };
    let key = "ab00000000000000000000000000000000000000000000000000000000000000";
    let by_key = PeerView {
        cert_spki_sha256: Some(key),
        ..PeerView::default()
    };
    assert_eq!(p.classify(&by_cn).unwrap().1.name(), "r");
    assert_eq!(p.classify(&by_san).unwrap().1.name(), "s");
    assert_eq!(p.classify(&by_key).unwrap().1.name(), "k");
    assert!(p.classify(&PeerView::default()).is_none());
    let e =
        errors("[[client]]\nname = \"k\"\nmatch = { cert_spki_sha256 = \"xyz\" }\nallow = []\n");
    assert_eq!(
        e,
        ["p.toml:3:30: `cert_spki_sha256` must be 64 hex digits (the SHA-256 of the certificate's public key)"]
    );
}

#[test]
fn unknown_keys_with_suggestions() {
    let e = errors(
        "[defaults]\nmax_inflight_call = 5\n\n[[client]]\nname = \"a\"\nmatch = \"any\"\nallow = []\nalow = []\n[limits]\n",
    );
    assert_eq!(
        e,
        [
            "p.toml:2:1: unknown key `max_inflight_call` in [defaults] (did you mean `max_inflight_calls`?)",
            "p.toml:8:1: unknown key `alow` in [[client]] (did you mean `allow`?)",
            "p.toml:9:2: unknown key `limits` in the policy file; expected one of: defaults, client",
        ]
    );
}

#[test]
fn bad_units_and_types() {
    let e = errors(
        "[defaults]\nmax_message_bytes = \"4 parsecs\"\nidle_timeout = \"30\"\nburst = 0\nmax_exports = -1\n[[client]]\nname = \"a\"\nmatch = \"any\"\nallow = []\n",
    );
    assert_eq!(
        e,
        [
            "p.toml:2:21: `max_message_bytes`: unknown size unit \"parsecs\" in \"4 parsecs\": use B, KiB, MiB or GiB (e.g. \"4 MiB\")",
            "p.toml:3:16: `idle_timeout`: duration \"30\" has no unit: write e.g. \"30s\", \"500ms\" or \"5 min\"",
            "p.toml:4:9: `burst` must be at least 1",
            "p.toml:5:15: `max_exports` must be a whole number from 0 to 4294967295",
        ]
    );
}

#[test]
fn unknown_interfaces_and_methods_with_did_you_mean() {
    let e = errors(
        "[[client]]\nname = \"a\"\nmatch = \"any\"\nallow = [\"Store.namespce\", \"Namspace.*\", \"Bogus.get\", \"Namespace.get\"]\n",
    );
    assert_eq!(
        e,
        [
            "p.toml:4:10: interface `Store` has no method `namespce` (did you mean `Store.namespace`?)",
            "p.toml:4:28: unknown interface `Namspace` (did you mean `Namespace`?)",
            "p.toml:4:42: unknown interface `Bogus`",
        ]
    );
}

#[test]
fn duplicate_and_unreachable_classes() {
    let e = errors(
        "[[client]]\nname = \"a\"\nmatch = \"any\"\nallow = []\n\n[[client]]\nname = \"a\"\nmatch = { unix_uid = 0 }\nallow = []\n",
    );
    assert_eq!(
        e,
        [
            "p.toml:7:8: duplicate client class `a` (first defined at p.toml:2:8)",
            "p.toml:8:9: client class `a` is unreachable: class `a` (p.toml:3:9) matches any client before it",
        ]
    );
}

#[test]
fn bad_matchers_and_missing_keys() {
    let e = errors(
        "[[client]]\nname = \"a\"\nmatch = { source = \"300.1.1.1/8\" }\nallow = []\n\n[[client]]\nmatch = { uid = 3 }\n",
    );
    assert_eq!(
        e,
        [
            "p.toml:3:20: `300.1.1.1/8` is not an address or network: write e.g. \"127.0.0.1/32\" or \"10.0.0.0/8\"",
            "p.toml:6:1: client class without `name`: add `name = \"...\"`",
            "p.toml:6:1: client class without `allow`: add e.g. `allow = []` (deny everything)",
            "p.toml:7:11: unknown key `uid` in `match`; expected one of: source, unix_uid, cert_cn, cert_san, cert_spki_sha256",
        ]
    );
}

#[test]
fn syntax_errors_are_located() {
    let e = errors("[[client]]\nname = \"a\nmatch = \"any\"\n");
    assert!(e[0].starts_with("p.toml:2:"), "{e:?}");
}

#[test]
fn amplification_quotas_are_read_with_their_units() {
    let p = Policy::parse(
        "p.toml",
        "[defaults]\nmax_caps_per_message = 16\nmax_client_outgoing_bytes = \"8 MiB\"\n\n[[client]]\nname = \"a\"\nmatch = \"any\"\nallow = []\nmax_caps_per_message = 4\n",
        Catalog::builtin(),
    )
    .unwrap();
    let q = p.class("a").unwrap().quotas();
    assert_eq!(
        (q.max_caps_per_message, q.max_client_outgoing_bytes),
        (4, 8 << 20)
    );
    let e = errors("[defaults]\nmax_client_outgoing_bytes = \"5 parsecs\"\nmax_caps_per_message = \"many\"\n[[client]]\nname = \"a\"\nmatch = \"any\"\nallow = []\n");
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].starts_with("p.toml:2:29: `max_client_outgoing_bytes`"),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("p.toml:3:24: `max_caps_per_message` must be a whole number"),
        "{e:?}"
    );
}

const METHODS: &str = r#"[[client]]
name  = "writer"
match = { source = "127.0.0.2/32" }
allow = ["*"]

[client.methods."Namespace.put"]
calls_per_second   = 5
burst              = 5
max_inflight_calls = 2

[client.methods."Reader.*"]
max_inflight_calls = 8

[client.methods."store.capnp:Store.namespace"]
calls_per_second = 10
"#;

#[test]
fn method_rules_resolve_like_allowlist_names_and_keep_their_quotas() {
    let c = Catalog::builtin();
    let p = Policy::parse("p.toml", METHODS, c).unwrap();
    let class = p.class("writer").unwrap();
    let rules = class.method_quotas();
    assert_eq!(rules.len(), 3);
    assert_eq!(rules[0].pattern, "Namespace.put");
    assert_eq!(rules[0].location, "p.toml:6:17");
    let rate = rules[0].rate.unwrap();
    assert_eq!((rate.calls_per_second.get(), rate.burst.get()), (5, 5));
    assert_eq!(rules[0].max_inflight_calls, Some(2));
    assert_eq!(rules[1].rate, None);
    // Without a burst: one second's worth.
    let rate = rules[2].rate.unwrap();
    assert_eq!((rate.calls_per_second.get(), rate.burst.get()), (10, 10));
    let put = c.method("Namespace", "put").unwrap();
    let get = c.method("Namespace", "get").unwrap();
    assert_eq!(class.method_quotas_of(put), &[0]);
    // Namespace.get is Reader.get: the Reader.* rule covers it.
    assert_eq!(class.method_quotas_of(get), &[1]);
    assert_eq!(
        class.method_quotas_of(c.method("Store", "namespace").unwrap()),
        &[2]
    );
    assert!(class
        .method_quotas_of(c.method("Namespace", "readOnly").unwrap())
        .is_empty());
    // The class quotas are untouched.
    assert_eq!(class.quotas().calls_per_second.get(), 2000);
}

#[test]
fn bad_method_rules_are_located_with_what_to_write() {
    let e = errors(
        r#"[[client]]
name = "a"
match = "any"
allow = ["Namespace.get"]

[client.methods."Namespace.pt"]
calls_per_second = 5

[client.methods."Namespace.get"]
calls_per_secnd = 5
burst = 0

[client.methods."Namespace.list"]
burst = 3

[client.methods."Namespace.put"]
calls_per_second = 1

[client.methods."Reader.*"]
"#,
    );
    assert_eq!(
        e,
        [
            "p.toml:6:17: interface `Namespace` has no method `pt` (did you mean `Namespace.put`?)",
            "p.toml:10:1: unknown key `calls_per_secnd` in method rule `Namespace.get` (did you mean `calls_per_second`?)",
            "p.toml:11:9: `burst` must be at least 1",
            "p.toml:14:1: `burst` needs `calls_per_second` in method rule `Namespace.list`",
            "p.toml:16:17: method rule `Namespace.put` has no effect: client class `a` allows none of the methods it names (add them to `allow`, or remove the rule)",
            "p.toml:19:17: method rule `Reader.*` sets no quota: add `calls_per_second` (and `burst`) or `max_inflight_calls`",
        ]
    );
    let e = errors("[[client]]\nname = \"a\"\nmatch = \"any\"\nallow = []\nmethods = 3\n");
    assert_eq!(
        e,
        ["p.toml:5:11: `methods` must be a table of method rules: write `[client.methods.\"Iface.method\"]`"]
    );
}

use capgate_schema::Catalog;

use super::*;

const SCHEMA: &[u8] = include_bytes!("../../../schema/fixtures/audit.cgr");
const POLICY: &str = include_str!("../../../schema/fixtures/audit.toml");

fn fixture(policy: &str) -> AuditReport {
    let catalog = Catalog::from_code_generator_request(SCHEMA).unwrap();
    let policy = Policy::parse("audit.toml", policy, &catalog).unwrap();
    audit(&policy, &catalog, catalog.interface("Gate").unwrap())
}

fn escape(method: &str, field: &str, kind: OpaqueKind) -> OpaqueEscape {
    OpaqueEscape {
        method: method.into(),
        field: field.into(),
        kind,
    }
}

#[test]
fn the_fixture_report_is_exact() {
    let r = fixture(POLICY);
    let want = r#"audit of audit.toml from bootstrap Gate

client "guest"
  reachable interfaces (6):
    Archive       subclass of Room
    Detail        Listener.event params.detail
    Gate          bootstrap
    Room          Gate.open results.room
    Secret        Gate.secret results.box.item
    Subscription  Gate.subscribe results.subscription
  callable (5):
    Gate.open
    Gate.secret
    Gate.subscribe
    Room.read
    Secret.reveal
  audit.toml:8:86: warning: dead rule "Admin.wipe": no allowed path reaches Admin.wipe
  callbacks, handed to the server (1):
    Gate.subscribe params.listener  Listener
  reachable, nothing allowed: Detail, Subscription

client "operator"
  reachable interfaces (9):
    Admin         Gate.admin results.admin
    Archive       subclass of Room
    Chain         Gate.chain results.chain
    Detail        Listener.event params.detail
    Gate          bootstrap
    Room          Gate.open results.room
    Secret        Gate.secret results.box.item
    Shelf         Gate.shelf results.shelf
    Subscription  Gate.subscribe results.subscription
  callable (14):
    Detail.more
    Gate.admin
    Gate.anyShelf
    Gate.chain
    Gate.index
    Gate.open
    Gate.raw
    Gate.secret
    Gate.shelf
    Gate.subscribe
    Room.grant
    Room.read
    Shelf.get
    Subscription.cancel
  warning: opaque escape: Gate.raw results.thing is an AnyPointer (the type graph cannot see which capabilities it carries)
  warning: opaque escape: Room.grant results.cap is a Capability (the type graph cannot see which capabilities it carries)
  warning: opaque escape: Shelf.get results.item is an unbound generic parameter (the type graph cannot see which capabilities it carries)
  allowed only by a wildcard (11):
    Gate.admin      "Gate.*" at audit.toml:13:10
    Gate.anyShelf   "Gate.*" at audit.toml:13:10
    Gate.chain      "Gate.*" at audit.toml:13:10
    Gate.index      "Gate.*" at audit.toml:13:10
    Gate.open       "Gate.*" at audit.toml:13:10
    Gate.raw        "Gate.*" at audit.toml:13:10
    Gate.secret     "Gate.*" at audit.toml:13:10
    Gate.shelf      "Gate.*" at audit.toml:13:10
    Gate.subscribe  "Gate.*" at audit.toml:13:10
    Room.grant      "Room.*" at audit.toml:13:20
    Room.read       "Room.*" at audit.toml:13:20
  callbacks, handed to the server (1):
    Gate.subscribe params.listener  Listener
  reachable, nothing allowed: Admin, Chain, Secret

4 warnings
"#;
    assert_eq!(r.to_string(), want);
    assert_eq!(r.warnings, 4);
    let guest = &r.classes[0];
    assert_eq!(
        guest.dead_rules,
        [DeadRule {
            pattern: "Admin.wipe".into(),
            location: "audit.toml:8:86".into(),
            methods: vec!["Admin.wipe".into()],
        }]
    );
    assert!(guest.wildcard_allowed.is_empty() && guest.opaque_escapes.is_empty());
    // Shelf(Room) yields a Room; the bare Shelf an unbound parameter: one escape, not two.
    assert_eq!(
        r.classes[1].opaque_escapes,
        [
            escape("Gate.raw", "results.thing", OpaqueKind::AnyPointer),
            escape("Room.grant", "results.cap", OpaqueKind::Capability),
            escape("Shelf.get", "results.item", OpaqueKind::UnboundGeneric),
        ]
    );
}

#[test]
fn a_rule_for_a_callback_is_dead_and_a_denied_path_reaches_nothing() {
    // Listener is the client's own object: the server calls it, the allowlist never sees it.
    let r = fixture(
        "[[client]]\nname = \"c\"\nmatch = \"any\"\n\
         allow = [\"Gate.subscribe\", \"Listener.event\", \"Gate.index\"]\n",
    );
    let c = &r.classes[0];
    assert_eq!(c.dead_rules[0].methods, ["Listener.event"]);
    // Through a list, a union and a group; Subscription was reached first by subscribe.
    let reached: Vec<(&str, &str)> = c
        .reachable_interfaces
        .iter()
        .map(|r| (r.name.as_str(), r.via.as_str()))
        .collect();
    assert_eq!(
        reached,
        [
            ("Archive", "subclass of Room"),
            ("Detail", "Listener.event params.detail"),
            ("Gate", "bootstrap"),
            ("Room", "Gate.index results.index.rooms[]"),
            ("Subscription", "Gate.subscribe results.subscription"),
        ]
    );
    assert_eq!(r.warnings, 1);
}

#[test]
fn generics_that_grow_their_arguments_end_in_an_unbound_escape() {
    // Chain(Room).next returns Chain(Box(Room)), and so on: the walk explores a bounded
    // number of argument sets, then the interface with its parameter unbound.
    let r = fixture(
        "[[client]]\nname = \"c\"\nmatch = \"any\"\nallow = [\"Gate.chain\", \"Chain.*\"]\n",
    );
    let c = &r.classes[0];
    assert_eq!(
        c.opaque_escapes,
        [escape(
            "Chain.item",
            "results.item",
            OpaqueKind::UnboundGeneric
        )]
    );
    assert!(c
        .reachable_interfaces
        .iter()
        .any(|r| r.name == "Room" && r.via == "Chain.item results.item"));
}

#[test]
fn the_demo_policy_has_no_warnings() {
    let catalog = Catalog::builtin();
    let policy = Policy::parse(
        "policy.toml",
        include_str!("../../../examples/policy.toml"),
        catalog,
    )
    .unwrap();
    let r = audit(&policy, catalog, catalog.interface("Store").unwrap());
    assert_eq!(r.warnings, 0, "{r}");
    let anonymous = &r.classes[2];
    assert_eq!(
        anonymous.callable,
        ["Reader.get", "Reader.list", "Store.namespace"]
    );
    // `*` grants every reachable method; each is listed.
    assert_eq!(r.classes[1].wildcard_allowed.len(), 13);
    assert_eq!(
        r.classes[1].callbacks,
        [CallbackParam {
            method: "Namespace.watch".into(),
            field: "params.watcher".into(),
            interface: "Watcher".into(),
        }]
    );
}

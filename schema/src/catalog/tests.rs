use super::*;

const VAULT: &[u8] = include_bytes!("../../fixtures/vault.cgr");
const OTHER: &[u8] = include_bytes!("../../fixtures/other.cgr");
const AUDIT: &[u8] = include_bytes!("../../fixtures/audit.cgr");

fn vault() -> Catalog {
    Catalog::from_code_generator_request(VAULT).unwrap()
}

fn both() -> Catalog {
    Catalog::from_requests(&[VAULT, OTHER]).unwrap()
}

#[test]
fn inherited_methods_resolve_to_the_superclass_pair() {
    let c = Catalog::builtin();
    let via_namespace = c.method("Namespace", "get").unwrap();
    let via_reader = c.method("Reader", "get").unwrap();
    assert_eq!(via_namespace, via_reader);
    assert_eq!(via_reader.interface_id, c.interface("Reader").unwrap().id);
    assert_eq!(c.name_of(via_namespace), "Reader.get");
    let put = c.method("Namespace", "put").unwrap();
    assert_eq!(put.method_id, 0);
    assert_eq!(c.name_of(put), "Namespace.put");
}

#[test]
fn unknown_names_get_suggestions() {
    let c = Catalog::builtin();
    assert_eq!(
        c.method("Namespace", "pt").unwrap_err().to_string(),
        "interface `Namespace` has no method `pt` (did you mean `Namespace.put`?)"
    );
    assert_eq!(
        c.interface("Stor").unwrap_err().to_string(),
        "unknown interface `Stor` (did you mean `Store`?)"
    );
    assert_eq!(
        c.interface("Nothing").unwrap_err().to_string(),
        "unknown interface `Nothing`"
    );
}

#[test]
fn a_user_schema_gives_nested_inherited_and_generic_interfaces() {
    let c = vault();
    let names: Vec<&str> = c.interfaces().iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Box",
            "Callback",
            "Container",
            "Shelf",
            "Vault",
            "Vault.Admin"
        ]
    );
    assert!(c.interface("Container").unwrap().generic);
    assert_eq!(c.interface("Vault.Admin").unwrap().file, "vault.capnp");
    // Nested by scope, inherited by either spelling.
    let wipe = c.resolve("Vault.Admin.wipe").unwrap().unwrap();
    assert_eq!(c.name_of(wipe[0]), "Vault.Admin.wipe");
    assert_eq!(
        c.resolve("Vault.store").unwrap(),
        c.resolve("Box.store").unwrap()
    );
    let all: Vec<String> = c
        .resolve("Vault.*")
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|m| c.name_of(m))
        .collect();
    assert_eq!(
        all,
        [
            "Vault.open",
            "Vault.admin",
            "Vault.watch",
            "Vault.shelf",
            "Box.store",
            "Box.fetch"
        ]
    );
    assert_eq!(c.resolve("*").unwrap(), None);
    assert_eq!(
        c.resolve("vault.capnp:Vault.Admin.grant").unwrap(),
        c.resolve("Vault.Admin.grant").unwrap()
    );
    // Param and result types are there to follow.
    let open = &c.interface("Vault").unwrap().methods[0];
    let results = c.struct_by_id(open.results).unwrap();
    assert_eq!(
        results.fields[0].ty,
        FieldType::Interface {
            id: c.interface("Box").unwrap().id,
            brand: Brand::default()
        }
    );
    let grant = &c.interface("Vault.Admin").unwrap().methods[1];
    assert_eq!(
        c.struct_by_id(grant.results).unwrap().fields[0].ty,
        FieldType::Capability
    );
}

/// The type of the only field of `Interface.method`'s results.
fn result_type(c: &Catalog, interface: &str, method: &str) -> FieldType {
    let m = c
        .resolve(&format!("{interface}.{method}"))
        .unwrap()
        .unwrap()[0];
    let info = &c.by_id(m.interface_id).unwrap().methods[usize::from(m.method_id)];
    c.struct_by_id(info.results).unwrap().fields[0].ty.clone()
}

#[test]
fn generic_uses_carry_their_type_arguments() {
    let c = Catalog::from_code_generator_request(AUDIT).unwrap();
    let id = |name: &str| c.interface(name).unwrap().id;
    let FieldType::Struct { id: box_id, brand } = result_type(&c, "Gate", "secret") else {
        panic!("Gate.secret returns a struct");
    };
    // `Box(Secret)`: the scope of `Box` binds its one parameter to the interface.
    assert_eq!(
        brand.scopes,
        [BrandScope {
            scope_id: box_id,
            bindings: Bindings::Bind(vec![Some(FieldType::Interface {
                id: id("Secret"),
                brand: Brand::default()
            })])
        }]
    );
    let fields = &c.struct_by_id(box_id).unwrap().fields;
    assert_eq!(
        fields[0].ty,
        FieldType::Parameter {
            scope_id: box_id,
            index: 0
        }
    );
    // `Shelf(Room)` binds; a bare `Shelf` leaves its parameter unbound (no scope listed).
    let FieldType::Interface { brand, .. } = result_type(&c, "Gate", "shelf") else {
        panic!("Gate.shelf returns an interface");
    };
    assert_eq!(
        brand.scopes[0].bindings,
        Bindings::Bind(vec![Some(FieldType::Interface {
            id: id("Room"),
            brand: Brand::default()
        })])
    );
    assert_eq!(
        result_type(&c, "Gate", "anyShelf"),
        FieldType::Interface {
            id: id("Shelf"),
            brand: Brand::default()
        }
    );
    // A generic interface's methods take their results' arguments from the interface's use.
    let get = &c.interface("Shelf").unwrap().methods[0];
    assert_eq!(
        get.result_brand.scopes,
        [BrandScope {
            scope_id: id("Shelf"),
            bindings: Bindings::Inherit
        }]
    );
    assert_eq!(
        result_type(&c, "Shelf", "get"),
        FieldType::Parameter {
            scope_id: id("Shelf"),
            index: 0
        }
    );
    assert_eq!(result_type(&c, "Gate", "raw"), FieldType::AnyPointer);
    assert_eq!(result_type(&c, "Room", "grant"), FieldType::Capability);
}

#[test]
fn names_two_files_declare_are_ambiguous_until_the_file_is_named() {
    let c = both();
    assert_eq!(
        c.resolve("Box.store").unwrap_err().to_string(),
        "interface `Box` is declared in other.capnp and vault.capnp: write \
         `other.capnp:Box.store` or `vault.capnp:Box.store` to pick one"
    );
    let peek = c.resolve("other.capnp:Box.peek").unwrap().unwrap();
    assert_eq!(c.name_of(peek[0]), "Box.peek");
    assert!(c.resolve("vault.capnp:Box.store").is_ok());
    assert_eq!(
        c.resolve("vault.capnp:Box.peek").unwrap_err().to_string(),
        "interface `Box` has no method `peek`"
    );
    assert_eq!(
        c.resolve("valt.capnp:Box.store").unwrap_err().to_string(),
        "no loaded schema file `valt.capnp` (did you mean `vault.capnp`?)"
    );
    assert_eq!(
        c.resolve("Vault.Admn.wipe").unwrap_err().to_string(),
        "unknown interface `Vault.Admn` (did you mean `Vault.Admin`?)"
    );
    assert_eq!(
        c.resolve("Vault").unwrap_err().to_string(),
        "`Vault`: write `Interface.method`, `Interface.*` or `*` (optionally \
         `file.capnp:Interface.method`)"
    );
}

/// A request with these nodes, built by hand (what a hostile or broken tool could send).
fn request(
    build: impl FnOnce(capnp::struct_list::Builder<'_, capnp::schema_capnp::node::Owned>),
) -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    {
        let r = m.init_root::<capnp::schema_capnp::code_generator_request::Builder>();
        build(r.init_nodes(3));
    }
    let mut out = Vec::new();
    capnp::serialize::write_message(&mut out, &m).unwrap();
    out
}

fn interface(
    mut n: capnp::schema_capnp::node::Builder<'_>,
    id: u64,
    name: &str,
    supers: &[u64],
    method_structs: Option<(u64, u64)>,
) {
    n.set_id(id);
    n.set_display_name(name);
    let mut i = n.init_interface();
    let mut s = i.reborrow().init_superclasses(supers.len() as u32);
    for (k, id) in supers.iter().enumerate() {
        s.reborrow().get(k as u32).set_id(*id);
    }
    let mut ms = i.init_methods(u32::from(method_structs.is_some()));
    if let Some((p, r)) = method_structs {
        let mut m = ms.reborrow().get(0);
        m.set_name("m");
        m.set_param_struct_type(p);
        m.set_result_struct_type(r);
    }
}

#[test]
fn hand_made_requests_are_refused_with_the_node_named() {
    let cycle = request(|mut nodes| {
        interface(nodes.reborrow().get(0), 1, "x.capnp:A", &[2], None);
        interface(nodes.reborrow().get(1), 2, "x.capnp:B", &[3], None);
        interface(nodes.reborrow().get(2), 3, "x.capnp:C", &[1], None);
    });
    let e = Catalog::from_code_generator_request(&cycle)
        .unwrap_err()
        .to_string();
    assert!(e.contains("extends itself"), "{e}");
    let missing = request(|mut nodes| {
        interface(nodes.reborrow().get(0), 1, "x.capnp:A", &[], Some((99, 1)));
        interface(nodes.reborrow().get(1), 2, "x.capnp:B", &[], None);
        interface(nodes.reborrow().get(2), 3, "x.capnp:C", &[], None);
    });
    assert_eq!(
        Catalog::from_code_generator_request(&missing)
            .unwrap_err()
            .to_string(),
        "invalid code generator request: method `x.capnp:A.m` names its params struct \
         0x0000000000000063, which is not in the request"
    );
    let duplicate = request(|mut nodes| {
        interface(nodes.reborrow().get(0), 1, "x.capnp:A", &[], None);
        interface(nodes.reborrow().get(1), 1, "x.capnp:B", &[], None);
        interface(nodes.reborrow().get(2), 3, "x.capnp:C", &[], None);
    });
    assert_eq!(
        Catalog::from_code_generator_request(&duplicate)
            .unwrap_err()
            .to_string(),
        "invalid code generator request: two nodes share the id 0x0000000000000001 (the \
         second is `x.capnp:B`)"
    );
    // A type argument naming a node the request lacks is refused like a field's type.
    let unknown_argument = request(|mut nodes| {
        interface(nodes.reborrow().get(0), 1, "x.capnp:A", &[], Some((2, 2)));
        let mut s = nodes.reborrow().get(1);
        s.set_id(2);
        s.set_display_name("x.capnp:S");
        let mut f = s.init_struct().init_fields(1).get(0);
        f.set_name("f");
        let mut t = f.init_slot().init_type().init_struct();
        t.set_type_id(2);
        let mut scope = t.init_brand().init_scopes(1).get(0);
        scope.set_scope_id(2);
        scope
            .init_bind(1)
            .get(0)
            .init_type()
            .init_interface()
            .set_type_id(77);
        interface(nodes.reborrow().get(2), 3, "x.capnp:C", &[], None);
    });
    assert_eq!(
        Catalog::from_code_generator_request(&unknown_argument)
            .unwrap_err()
            .to_string(),
        "invalid code generator request: field `x.capnp:S.f` has type 0x000000000000004d, \
         which is not in the request"
    );
    let not_an_interface = request(|mut nodes| {
        interface(nodes.reborrow().get(0), 1, "x.capnp:A", &[2], None);
        nodes.reborrow().get(1).set_id(2);
        nodes.reborrow().get(1).set_display_name("x.capnp");
        interface(nodes.reborrow().get(2), 3, "x.capnp:C", &[], None);
    });
    let e = Catalog::from_code_generator_request(&not_an_interface)
        .unwrap_err()
        .to_string();
    assert!(e.contains("which is not an interface"), "{e}");
}

#[test]
fn garbage_truncated_and_huge_requests_are_errors_not_panics() {
    assert!(Catalog::from_code_generator_request(b"").is_err());
    assert!(Catalog::from_code_generator_request(&[0xff; 64]).is_err());
    assert!(Catalog::from_code_generator_request(&VAULT[..VAULT.len() / 2]).is_err());
    let huge = vec![0u8; MAX_REQUEST_BYTES + 1];
    assert!(Catalog::from_code_generator_request(&huge)
        .unwrap_err()
        .to_string()
        .contains("exceed the limit"));
    // 100,000 interfaces in a chain of superclasses: loads, linearly.
    let mut m = capnp::message::Builder::new_default();
    {
        let r = m.init_root::<capnp::schema_capnp::code_generator_request::Builder>();
        let mut nodes = r.init_nodes(100_000);
        for k in 0..100_000u32 {
            let supers: &[u64] = if k == 0 { &[] } else { &[u64::from(k)] };
            interface(
                nodes.reborrow().get(k),
                u64::from(k) + 1,
                &format!("big.capnp:I{k}"),
                supers,
                None,
            );
        }
    }
    let mut bytes = Vec::new();
    capnp::serialize::write_message(&mut bytes, &m).unwrap();
    let start = std::time::Instant::now();
    let c = Catalog::from_code_generator_request(&bytes).unwrap();
    assert_eq!(c.interfaces().len(), 100_000);
    // Generous: linear work takes milliseconds; a quadratic walk would take minutes.
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
}

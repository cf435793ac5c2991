use super::*;

fn usage(namespaces: usize, entries: usize, bytes: usize) -> StoreUsage {
    StoreUsage {
        namespaces,
        entries,
        bytes,
    }
}

fn limits() -> StoreLimits {
    StoreLimits {
        max_bytes: 1000,
        max_bytes_per_client: 600,
        max_entries: 10,
        max_entries_per_client: 5,
        max_namespaces: 4,
        max_namespaces_per_client: 2,
        ..StoreLimits::default()
    }
}

fn owner(name: &str) -> Owner {
    Some(Arc::from(name))
}

#[test]
fn bounds_are_inclusive_and_count_what_is_given_back() {
    let (l, none) = (limits(), StoreUsage::default());
    let mut d = Data::default();
    d.charge(&None, usage(0, 0, 900));
    assert!(d.check(&l, &None, none, false, usage(0, 1, 100)).is_ok());
    let e = d
        .check(&l, &None, none, false, usage(0, 1, 101))
        .unwrap_err();
    assert_eq!(e.kind, capnp::ErrorKind::Overloaded);
    assert!(
        e.extra.contains(
            "the store holds 900 bytes and this needs 101 more, over its max_bytes limit of 1000"
        ),
        "{e}"
    );
    assert!(d
        .check(&l, &None, usage(0, 0, 50), false, usage(0, 0, 150))
        .is_ok());
    assert!(d
        .check(&l, &None, none, false, usage(0, 0, usize::MAX))
        .is_err());
    // The shared owner has no share.
    assert!(d.check(&l, &None, none, false, usage(2, 0, 0)).is_ok());
    assert!(d.check(&l, &None, none, false, usage(5, 0, 0)).is_err());
}

#[test]
fn a_client_is_held_to_its_share_and_gets_back_only_what_was_its_own() {
    let (l, none) = (limits(), StoreUsage::default());
    let (a, b) = (owner("a"), owner("b"));
    let mut d = Data::default();
    d.charge(&a, usage(2, 5, 500));
    let e = d.check(&l, &a, none, false, usage(1, 0, 0)).unwrap_err();
    assert_eq!(
        e.extra,
        "client a holds 2 namespaces, its max_namespaces_per_client limit; remove some \
         (Store.remove, Namespace.remove) or raise StoreLimits::max_namespaces_per_client"
    );
    let e = d.check(&l, &a, none, false, usage(0, 1, 0)).unwrap_err();
    assert!(
        e.extra
            .starts_with("client a holds 5 keys, its max_entries_per_client limit"),
        "{e}"
    );
    let e = d.check(&l, &a, none, false, usage(0, 0, 101)).unwrap_err();
    assert!(e.extra.contains("client a holds 500 bytes and this needs 101 more, over its max_bytes_per_client limit of 600"), "{e}");
    // Replacing its own key: what the old one cost comes back first.
    assert!(d
        .check(&l, &a, usage(0, 1, 100), true, usage(0, 1, 200))
        .is_ok());
    // Replacing another client's key: the store gets it back, `b`'s share does not.
    assert!(d
        .check(&l, &b, usage(0, 1, 500), false, usage(0, 1, 600))
        .is_ok());
    assert!(d
        .check(&l, &b, usage(0, 1, 500), false, usage(0, 1, 601))
        .is_err());
    assert!(d.check(&l, &b, none, false, usage(2, 0, 0)).is_ok());
    assert!(d.check(&l, &b, none, false, usage(3, 0, 0)).is_err());

    d.refund(&a, usage(2, 5, 500));
    assert_eq!(d.usage, none);
    assert!(
        d.clients.is_empty(),
        "a client charged nothing has no entry"
    );
}

#[test]
fn charges_are_the_bytes_plus_fixed_bookkeeping() {
    assert_eq!(
        namespace_charge("abc"),
        usage(1, 0, 3 + NAMESPACE_OVERHEAD_BYTES)
    );
    assert_eq!(
        entry_charge("k", 10),
        usage(0, 1, 11 + ENTRY_OVERHEAD_BYTES)
    );
}

//! Arbitrary text as a policy file: must never panic; every error must be located inside
//! the text.
#![no_main]

use capgate_policy::Policy;
use capgate_schema::Catalog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = Policy::parse("fuzz.toml", text, Catalog::builtin()) {
        let lines = text.lines().count().max(1);
        for e in errors.0 {
            assert!(e.line <= lines + 1, "{e} is outside a {lines}-line file");
        }
    }
});

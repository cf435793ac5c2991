//! Arbitrary bytes as a CodeGeneratorRequest: the catalog must refuse or accept them without
//! panicking, every name it accepts must resolve back to its own interface, and the policy
//! audit must walk it from any interface without panicking (or running away).
#![no_main]

use capgate_policy::Policy;
use capgate_schema::Catalog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(catalog) = Catalog::from_code_generator_request(data) else {
        return;
    };
    for i in catalog.interfaces() {
        for (name, m) in catalog.methods(i) {
            let _ = catalog.name_of(m);
            let _ = catalog.resolve(&format!("{}.{name}", i.name));
        }
        let _ = catalog.resolve(&format!("{}:{}.*", i.file, i.name));
    }
    let policy = Policy::allow_all();
    for i in catalog.interfaces().iter().take(8) {
        let report = capgate_policy::audit(&policy, &catalog, i);
        let _ = report.to_string();
    }
});

//! Arbitrary bytes as a CodeGeneratorRequest: the catalog must refuse or accept them without
//! panicking, and every name it accepts must resolve back to its own interface.
#![no_main]

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
});

//! Compiles `schema/vault.capnp` into Rust (capnpc) and keeps the compiler's
//! CodeGeneratorRequest beside it (`$OUT_DIR/vault.cgr`) for `Catalog::from_code_generator_request`.
//! The compiler runs in-process as WebAssembly (capnpc-embedded): no `capnp` install needed.
//! With `capnp` installed, capnpc alone does both:
//! `capnpc::CompilerCommand::new().file("schema/vault.capnp").raw_code_generator_request_path(out.join("vault.cgr")).run()`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=schema/vault.capnp");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let request = capnpc_embedded::CompileCommand::new()
        .src_prefix("schema")
        .file("schema/vault.capnp")
        .compile()
        .expect("schema/vault.capnp compiles");
    std::fs::write(out.join("vault.cgr"), &request).expect("OUT_DIR is writable");
    capnpc::codegen::CodeGenerationCommand::new()
        .output_directory(&out)
        .run(&request[..])
        .expect("Rust code generated for schema/vault.capnp");
}

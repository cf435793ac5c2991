//! Regenerates `schema/src/generated/*.rs` from the `.capnp` files with the `capnp` compiler.
//! Run through `scripts/regenerate-schema`, which also formats the output.

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.as_path();
    let out = root.join("src/generated");
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(root).output_path(&out);
    for file in ["store.capnp", "bench.capnp"] {
        cmd.file(root.join(file));
    }
    if let Err(e) = cmd.run() {
        eprintln!("capgate-schema-codegen: {e}");
        std::process::exit(1);
    }
}

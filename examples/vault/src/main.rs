//! Runs the vault behind capgate on 127.0.0.1 and shows, from two clients, what the policy
//! allows: `cargo run -p capgate-example-vault`.

use capgate::{cast, Client};
use capgate_example_vault::vault_capnp::{box_, vault};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let catalog = capgate_example_vault::catalog();
    let policy = capgate_example_vault::policy(&catalog).map_err(|e| e.to_string())?;
    let server = capgate_example_vault::server("127.0.0.1:0".parse()?, policy)?;
    let capgate::ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else {
        return Err("expected a TCP listener".into());
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(server.serve())
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&rt, async move {
        // From 127.0.0.1: the "admin" class.
        let admin = Client::connect(addr).await?;
        let v: vault::Client = admin.bootstrap();
        let mut open = v.open_request();
        open.get().set_name("shelf");
        let b = open.send().pipeline.get_box();
        let mut put = b.store_request();
        put.get().set_key("k");
        put.get().set_value(b"v");
        put.send().promise.await?;
        println!("admin: stored k in box \"shelf\"");
        // From 127.0.0.2: the "reader" class.
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind("127.0.0.2:0".parse()?)?;
        let (r, w) = sock.connect(addr).await?.into_split();
        let reader = Client::builder().from_stream(r, w);
        let v: vault::Client = reader.bootstrap();
        let as_box: box_::Client = cast(&v);
        let mut fetch = as_box.fetch_request();
        fetch.get().set_key("k");
        let found = fetch.send().promise.await?.get()?.get_found();
        println!("reader: Vault.fetch allowed (by Box.fetch): found = {found}");
        let mut store = as_box.store_request();
        store.get().set_key("k");
        match store.send().promise.await {
            Ok(_) => println!("reader: Box.store allowed?"),
            Err(e) => println!("reader: {}", e.extra),
        }
        let wipe = v.admin_request().send().pipeline.get_admin().wipe_request();
        match wipe.send().promise.await {
            Ok(_) => println!("reader: wipe allowed?"),
            Err(e) => println!("reader (pipelined on a denied call): {}", e.extra),
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

use capgate_schema::bench_capnp::echo;
use capnp::capability::Rc;

/// The `Echo` interface of `schema/bench.capnp`: returns its payload; `panic` panics inside
/// the handler (to prove that only the calling connection is lost).
#[derive(Clone, Copy, Debug, Default)]
pub struct EchoService;

impl EchoService {
    /// A capability for this service.
    pub fn client(self) -> echo::Client {
        capnp_rpc::new_client(self)
    }
}

impl echo::Server for EchoService {
    async fn echo(
        self: Rc<Self>,
        params: echo::EchoParams,
        mut results: echo::EchoResults,
    ) -> Result<(), capnp::Error> {
        let payload = params.get()?.get_payload()?;
        results.get().set_payload(payload);
        Ok(())
    }

    async fn panic(
        self: Rc<Self>,
        _: echo::PanicParams,
        _: echo::PanicResults,
    ) -> Result<(), capnp::Error> {
        panic!("Echo.panic called: this handler panics on purpose");
    }
}

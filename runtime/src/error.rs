/// Errors from building or running a server or client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is incomplete or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A setting was refused by what reads or checks it (a PEM file, rustls, a TLS server
    /// name, a quota store URL): `context` says which setting, `source` why.
    #[error("invalid configuration: {context}: {source}")]
    Setting {
        /// Which setting.
        context: String,
        /// The refusal, e.g. a `rustls::Error` or a `redis::RedisError`.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The RPC layer failed.
    #[error(transparent)]
    Rpc(#[from] capnp::Error),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn setting(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Setting {
            context: context.into(),
            source: Box::new(source),
        }
    }
}

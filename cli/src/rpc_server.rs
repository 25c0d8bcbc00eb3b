//! `llama rpc-server`: this machine's device behind ggml's RPC server, for other hosts'
//! `--rpc`. The server runs inside the selected backend plugin (which links ggml's RPC
//! backend) and blocks until the process is stopped.

use llama_host::Backends;

use crate::opts::{Global, RpcServerOpts};
use crate::CliError;

pub fn run(g: &Global, o: &RpcServerOpts) -> Result<(), CliError> {
    let mut backends = Backends::discover(&g.discovery());
    let selected = backends.select(o.backend.clone());
    if g.verbose > 0 {
        err!("{}", backends.report());
    }
    let backend = selected?;
    // Checked here too, before the banner: an address in use is the user's to change.
    std::net::TcpListener::bind(&o.endpoint).map_err(|e| CliError::InvalidArg { field: "--host/--port", reason: format!("cannot listen on {}: {e}", o.endpoint) })?;
    if !o.loopback {
        tracing::warn!(
            "the RPC server listens on {}: its protocol has no authentication and no encryption, so anyone who can reach this port can run computations on this machine and read or write its device memory; use it on a trusted network only",
            o.endpoint
        );
    }
    errln!("llama: RPC server on {} serving the {} backend's devices (Ctrl-C stops it)", o.endpoint, backend.name());
    let cache = o.cache.as_ref().map(|d| d.to_string_lossy().into_owned());
    let threads = u32::try_from(o.threads).unwrap_or(1);
    Err(CliError::RpcServer(backend.rpc_serve(&o.endpoint, cache.as_deref(), threads)))
}

//! The socket side: HTTP/1.1 connections with a deadline for their headers, served until
//! Ctrl-C.

use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use crate::{Server, ServerConfig};

/// How long open connections get to finish their answers after Ctrl-C.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves until Ctrl-C.
pub async fn serve(config: ServerConfig) -> Result<()> {
    let server = Server::start(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    eprintln!(
        "sdrs: serving on http://{} (A1111 API at /sdapi/v1, jobs at /sdrs/v1/jobs); Ctrl-C stops",
        listener.local_addr().unwrap_or(config.listen)
    );
    let mut http = hyper::server::conn::http1::Builder::new();
    // A connection that stops mid-header is closed (bodies have their own deadline, see
    // `body::read_json`).
    http.timer(TokioTimer::new())
        .header_read_timeout(config.limits.header_timeout);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, most likely: let some connections end.
                        eprintln!("sdrs: accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let service = TowerToHyperService::new(server.router.clone());
                let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    server.stop_jobs();
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("sdrs: some connections were still open after {DRAIN:?}; closing them");
    }
    tokio::task::spawn_blocking(move || server.shut_down()).await?;
    Ok(())
}

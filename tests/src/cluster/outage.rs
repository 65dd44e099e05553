//! An API server that goes away and comes back, as a client sees it: a TCP forwarder that can
//! cut every connection and refuse new ones. Tests point a component's client at it to check
//! what it does during an outage without stopping the API server every other test uses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A TCP forwarder to `upstream` (`host:port`); stops forwarding when dropped.
pub struct FlakyProxy {
    pub addr: SocketAddr,
    cut: tokio::sync::broadcast::Sender<()>,
    refusing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyProxy {
    pub async fn start(upstream: String) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = tokio::sync::broadcast::channel(1);
        let refusing = Arc::new(AtomicBool::new(false));
        let (cut2, refusing2) = (cut.clone(), refusing.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if refusing2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        Ok(FlakyProxy {
            addr,
            cut,
            refusing,
            task,
        })
    }

    /// `true`: cut every open connection and refuse new ones; `false`: forward again.
    pub fn outage(&self, down: bool) {
        self.refusing.store(down, Ordering::SeqCst);
        if down {
            let _ = self.cut.send(());
        }
    }

    /// A copy of `config` whose API server is reached through this proxy.
    pub fn config_through(&self, config: &kube::Config) -> kube::Config {
        let mut proxied = config.clone();
        if let Ok(url) = format!("https://{}", self.addr).parse() {
            proxied.cluster_url = url;
        }
        proxied
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

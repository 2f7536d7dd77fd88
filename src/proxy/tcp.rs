//! Opaque TCP: splice two streams both ways, with an idle timeout.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

/// Connects to `addr` within `timeout`, with Nagle off: the data path writes whole messages and
/// waits for answers, so delaying small writes only adds latency.
pub async fn connect(addr: impl ToSocketAddrs + std::fmt::Display, timeout: Duration) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to {addr} timed out")))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Copies both directions until both ends have closed, or until no byte moved either way for
/// `idle`. Returns (bytes a→b, bytes b→a).
pub async fn splice<A, B>(a: &mut A, b: &mut B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut a_to_b, mut b_to_a) = (0u64, 0u64);
    let (mut a_open, mut b_open) = (true, true);
    let mut buf_a = vec![0u8; 16 * 1024];
    let mut buf_b = vec![0u8; 16 * 1024];
    while a_open || b_open {
        let step = tokio::time::timeout(idle, async {
            tokio::select! {
                n = ar.read(&mut buf_a), if a_open => match n {
                    Ok(0) | Err(_) => { a_open = false; let _ = bw.shutdown().await; Ok(()) }
                    Ok(n) => { a_to_b += n as u64; bw.write_all(&buf_a[..n]).await }
                },
                n = br.read(&mut buf_b), if b_open => match n {
                    Ok(0) | Err(_) => { b_open = false; let _ = aw.shutdown().await; Ok(()) }
                    Ok(n) => { b_to_a += n as u64; aw.write_all(&buf_b[..n]).await }
                },
            }
        })
        .await;
        match step {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break, // a write failed, or idle for too long
        }
    }
    (a_to_b, b_to_a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_stops_when_idle() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { splice(&mut proxy_a, &mut proxy_b, Duration::from_millis(200)).await });
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"pong!").await.unwrap();
        let mut back = [0u8; 5];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!((&got, &back), (b"ping", b"pong!"));
        // Nobody says anything: the idle timeout ends the splice.
        let (up, down) = tokio::time::timeout(Duration::from_secs(2), task).await.unwrap().unwrap();
        assert_eq!((up, down), (4, 5));
    }
}

//! The application the real-node test (`tests/node.rs`) runs in pods, in images it builds from
//! this one binary: a stand-in for any service, so the mesh is seen doing its work on an app
//! that knows nothing about it. Standard library only.
//!
//! ```text
//! node_app pause           the pod sandbox's pause process: waits until killed
//! node_app serve PORT      plain HTTP/1.1; answers every request with 200 and its request
//!                          headers, one `name: value` per line
//! node_app get URL         one plain `GET` of an `http://` URL; prints the status line, a blank
//!                          line and the body; exits 0 when an answer came, 1 when none did
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["pause"] => loop {
            std::thread::park();
        },
        ["serve", port] => serve(port),
        ["get", url] => get(url),
        _ => Err("usage: node_app pause | serve PORT | get URL".to_string()),
    };
    if let Err(e) = result {
        eprintln!("node_app: {e}");
        std::process::exit(1);
    }
}

fn serve(port: &str) -> Result<(), String> {
    let listener = TcpListener::bind(("0.0.0.0", port.parse::<u16>().map_err(|e| e.to_string())?))
        .map_err(|e| format!("binding port {port}: {e}"))?;
    eprintln!("node_app: serving on {port}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            if let Err(e) = answer(stream) {
                eprintln!("node_app: {e}");
            }
        });
    }
    Ok(())
}

/// Answers every request on the connection (keep-alive, as the sidecar pools connections).
fn answer(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut headers = String::new();
        let mut body_len = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let name = name.trim().to_ascii_lowercase();
                if name == "content-length" {
                    body_len = value.trim().parse().unwrap_or(0);
                }
                headers.push_str(&format!("{name}: {}\n", value.trim()));
            }
        }
        std::io::copy(&mut (&mut reader).take(body_len as u64), &mut std::io::sink())?;
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{headers}",
            headers.len()
        )?;
        out.flush()?;
    }
}

fn get(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let addr = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let mut stream = TcpStream::connect(&addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("reading the answer from {addr}: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| format!("no complete answer: {response:?}"))?;
    println!("{}\n\n{body}", head.lines().next().unwrap_or_default());
    Ok(())
}

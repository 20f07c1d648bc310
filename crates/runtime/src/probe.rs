//! `<binary> health`: asks the running service on `LISTEN_ADDR` whether it is ready,
//! for container health checks in images that have no shell and no curl.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

/// GETs `/health/ready` on this machine's `listen_addr` port: exit 0 on 200, 1 otherwise.
pub fn ready(listen_addr: SocketAddr) -> ExitCode {
    let target = if listen_addr.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, listen_addr.port()))
    } else {
        listen_addr
    };
    match status(target) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{target}/health/ready answered {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{target}/health/ready: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(target: SocketAddr) -> std::io::Result<u16> {
    // Above the readiness checks' own budget (`health::CHECK_TIMEOUT`), so a slow
    // check is answered as what it is, not taken for a dead process.
    let timeout = crate::health::CHECK_TIMEOUT + Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream
        .write_all(b"GET /health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

//! `testbed-relay`: the cross-region latency relays of the long-running testbed (`testbed/testbed up`), and
//! the client the chaos commands use to steer them.
//!
//! ```text
//! testbed-relay serve --control 127.0.0.1:19800 --links testbed/config/links
//! testbed-relay serve --control 127.0.0.1:19800 --link from=eu-west,to=us-east,listen=...,target=...,delay=40ms ...
//! testbed-relay ctl 127.0.0.1:19800 cut eu-west
//! ```

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpListener};
use testbed::links::{control, LinkSpec, Links};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("ctl") => {
            let addr: SocketAddr = args
                .get(1)
                .context("usage: testbed-relay ctl ADDR COMMAND...")?
                .parse()
                .context("the control address, like 127.0.0.1:19800")?;
            print!("{}", control(addr, &args[2..].join(" "))?);
            Ok(())
        }
        _ => bail!(
            "usage: testbed-relay serve --control ADDR [--links FILE] [--link SPEC]...  |  testbed-relay ctl ADDR COMMAND..."
        ),
    }
}

fn serve(args: &[String]) -> Result<()> {
    let mut control_addr = None;
    let mut specs = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--control" => control_addr = Some(value.parse::<SocketAddr>()?),
            "--link" => specs.push(value.parse::<LinkSpec>()?),
            // One link per line; blank lines and `#` comments are skipped.
            "--links" => {
                let text = std::fs::read_to_string(value)
                    .with_context(|| format!("reading the links file {value}"))?;
                for line in text.lines().map(str::trim) {
                    if !line.is_empty() && !line.starts_with('#') {
                        specs.push(line.parse::<LinkSpec>()?);
                    }
                }
            }
            other => bail!("unknown option {other}"),
        }
    }
    let control_addr = control_addr.context("--control ADDR is required")?;
    let control_listener = TcpListener::bind(control_addr)
        .with_context(|| format!("binding the control port {control_addr}"))?;
    let links = Links::start(specs)?;
    for line in links.apply(&testbed::links::Command::Status)? {
        if line != "ok" {
            eprintln!("link {line}");
        }
    }
    eprintln!("control on {control_addr}");
    links.serve_control(control_listener);
    Ok(())
}

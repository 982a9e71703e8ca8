//! A test certificate authority made with the openssl command line, shared by
//! the MQTT tests and the agent bench (which includes this file by path).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A test CA with server and client certificates (X.509 v3, as rustls requires),
/// made with the openssl command line.
pub struct Pki {
    /// Where the files are: `ca.pem`, `server.pem`/`.key`, `<client>.pem`/`.key`.
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let pki = Pki {
            dir: dir.join("pki"),
        };
        std::fs::create_dir_all(&pki.dir).expect("pki dir");
        pki.new_key(
            "ca",
            &[
                "-x509",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=edgefleet-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        pki.issue(
            "server",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        );
        pki
    }

    /// `openssl req` making the P-256 key `<name>.key`, with `args` after.
    fn new_key(&self, name: &str, args: &[&str]) {
        let key = format!("{name}.key");
        let mut all = vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
        ];
        all.extend_from_slice(args);
        self.openssl(&all);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Issues `<name>.pem`/`<name>.key` with CN `name` and the given extensions.
    pub fn issue(&self, name: &str, ext: &str) {
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\n{}\n", ext.replace("\\n", "\n")),
        )
        .expect("ext");
        let (csr, pem, extf) = (
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        self.new_key(name, &["-out", &csr, "-subj", &format!("/CN={name}")]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extf,
        ]);
    }

    pub fn client(&self, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        if !self.dir.join(format!("{name}.pem")).exists() {
            self.issue(name, "extendedKeyUsage=clientAuth");
        }
        (
            self.dir.join("ca.pem"),
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        )
    }

    pub fn tls(&self, name: &str) -> rustls::ClientConfig {
        let (ca, cert, key) = self.client(name);
        edgefleet_agent::link::tls_config(&ca, &cert, &key).expect("tls config")
    }
}

//! TLS credentials for tests, made with openssl(1) in QEMU's directory layout.

use std::path::{Path, PathBuf};

use crate::process::run_in;

/// Credentials directories: `server/`, `client/` (with a certificate) and `nocert/`
/// (CA only), all under one CA.
#[derive(Debug)]
pub struct Pki {
    pub server: PathBuf,
    pub client: PathBuf,
    pub nocert: PathBuf,
}

/// Makes a CA and a server (CN `localhost`) and a client certificate under `root`.
pub fn make_pki(root: &Path) -> Pki {
    let work = root.join("pki");
    std::fs::create_dir_all(&work).unwrap();
    run_in(
        &work,
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=Strata Test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    for (name, cn, eku) in [
        ("server", "localhost", "serverAuth"),
        ("client", "client", "clientAuth"),
    ] {
        let ext = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage={eku}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        );
        std::fs::write(work.join(format!("{name}.ext")), ext).unwrap();
        run_in(
            &work,
            "openssl",
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        run_in(
            &work,
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &format!("{name}-cert.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    let pki = Pki {
        server: root.join("server"),
        client: root.join("client"),
        nocert: root.join("nocert"),
    };
    for (d, files) in [
        (
            &pki.server,
            &["ca-cert.pem", "server-cert.pem", "server-key.pem"][..],
        ),
        (
            &pki.client,
            &["ca-cert.pem", "client-cert.pem", "client-key.pem"][..],
        ),
        (&pki.nocert, &["ca-cert.pem"][..]),
    ] {
        std::fs::create_dir_all(d).unwrap();
        for f in files {
            std::fs::copy(work.join(f), d.join(f)).unwrap();
        }
    }
    pki
}

//! Ed25519 signing keys generated per test run: no key material lives in the repository.

use std::path::PathBuf;

use ed25519_dalek::{
    SigningKey,
    pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding},
};

/// A key pair written as PEM files into a directory of its own.
#[derive(Debug)]
pub struct TestKeys {
    dir: PathBuf,
}

impl TestKeys {
    /// Generates `count` key pairs: `signing-<i>.pem` (PKCS#8) and `public-<i>.pem` (SPKI).
    pub fn generate(count: usize) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "mobile-test-keys-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create the key directory");
        for i in 0..count {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let private = key
                .to_pkcs8_pem(LineEnding::LF)
                .expect("encode the private key");
            let public = key
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .expect("encode the public key");
            std::fs::write(dir.join(format!("signing-{i}.pem")), private.as_bytes())
                .expect("write the private key");
            std::fs::write(dir.join(format!("public-{i}.pem")), public)
                .expect("write the public key");
        }
        Self { dir }
    }

    pub fn signing(&self, i: usize) -> PathBuf {
        self.dir.join(format!("signing-{i}.pem"))
    }

    pub fn public(&self, i: usize) -> PathBuf {
        self.dir.join(format!("public-{i}.pem"))
    }

    /// Writes a file holding the public keys `indices`, one PEM after another, as
    /// `JWT_VERIFY_KEYS_FILE` takes them.
    pub fn verify_file(&self, indices: &[usize]) -> PathBuf {
        let mut pems = String::new();
        for &i in indices {
            pems.push_str(&std::fs::read_to_string(self.public(i)).expect("read a public key"));
        }
        let name = indices
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("-");
        let path = self.dir.join(format!("verify-{name}.pem"));
        std::fs::write(&path, pems).expect("write the verify keys");
        path
    }
}

impl Drop for TestKeys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

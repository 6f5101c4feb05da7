//! NATS in operator mode (decentralized JWT authentication) for the cluster tests: an operator,
//! its accounts and their users as the JWTs `nsc` issues, signed with NKeys, and the `.creds`
//! file a user connects with. The servers trust the operator and know the accounts from their
//! configuration (`resolver: MEMORY`); a user is any JWT an account signed.
//!
//! The claims are the JWT format version 2 of `nats-io/jwt`: a header
//! `{"typ":"JWT","alg":"ed25519-nkey"}`, the claims, and the issuer's Ed25519 signature of the
//! two, each in unpadded base64url.
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use outflow_collector::cluster::permissions::Permissions;
use serde_json::{Value, json};

/// A JWT with the NATS claims `nats` (an operator's, an account's or a user's) about
/// `subject`, named `name`, signed by `issuer`.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        // The claims' id; the servers do not check it against the claims' hash.
        "jti": format!("{name}-{}", &subject[..12]),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = issuer
        .sign(signed.as_bytes())
        .expect("an NKey with its seed signs");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// An operator with a system account and its accounts: the trust the servers are configured
/// with.
pub struct Operator {
    key: KeyPair,
    system: Account,
    accounts: Vec<Account>,
}

/// An account with JetStream (no limits); its users are JWTs it signs.
pub struct Account {
    name: String,
    key: KeyPair,
    jwt: String,
}

impl Operator {
    /// An operator with an account with JetStream of each of `accounts`' names.
    pub fn new(accounts: &[&str]) -> Operator {
        let key = KeyPair::new_operator();
        let system = Account::issued_by(&key, "SYS", false);
        let accounts = accounts
            .iter()
            .map(|name| Account::issued_by(&key, name, true))
            .collect();
        Operator {
            key,
            system,
            accounts,
        }
    }

    /// The account named `name`.
    pub fn account(&self, name: &str) -> &Account {
        self.accounts
            .iter()
            .find(|a| a.name == name)
            .expect("an account the operator was made with")
    }

    /// The servers' configuration: trust this operator, know its accounts.
    pub fn server_config(&self) -> String {
        let operator = jwt(
            &self.key,
            &self.key.public_key(),
            "outflow-test",
            json!({
                "system_account": self.system.key.public_key(),
                "type": "operator",
                "version": 2,
            }),
        );
        let preload: Vec<String> = std::iter::once(&self.system)
            .chain(&self.accounts)
            .map(|a| format!("  {}: \"{}\"\n", a.key.public_key(), a.jwt))
            .collect();
        format!(
            "operator: \"{operator}\"\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n{}}}\n",
            self.system.key.public_key(),
            preload.concat()
        )
    }
}

impl Account {
    fn issued_by(operator: &KeyPair, name: &str, jetstream: bool) -> Account {
        let key = KeyPair::new_account();
        let unlimited = if jetstream { -1 } else { 0 };
        let jwt = jwt(
            operator,
            &key.public_key(),
            name,
            json!({
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": unlimited, "disk_storage": unlimited,
                    "streams": unlimited, "consumer": unlimited,
                    "max_ack_pending": -1, "mem_max_stream_bytes": -1,
                    "disk_max_stream_bytes": -1,
                },
                "type": "account",
                "version": 2,
            }),
        );
        Account {
            name: name.to_owned(),
            key,
            jwt,
        }
    }

    /// The `.creds` file of a new user of this account with `permissions` (none: it may
    /// publish and subscribe to anything in the account), as `nsc generate creds` writes it.
    pub fn user_creds(&self, name: &str, permissions: Option<&Permissions>) -> String {
        let user = KeyPair::new_user();
        let mut nats = json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        });
        if let Some(p) = permissions {
            nats["pub"] = json!({ "allow": p.publish });
            nats["sub"] = json!({ "allow": p.subscribe });
        }
        let jwt = jwt(&self.key, &user.public_key(), name, nats);
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n",
            user.seed().expect("a new key has its seed")
        )
    }
}

//! `tapgate keys …`: diversification and session-key checks, issuer key sets.

use crate::cli_util::{hex16, hex_arg, input_err, passphrase, write_atomic};
use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use purse::crypto::{self, AesKey};
use purse::keys::{KdfParams, KeySet, Role, DEFAULT_AID, DEFAULT_SYSTEM_ID};
use std::path::{Path, PathBuf};

/// File name of the issuer's sealed key set inside a key directory.
pub const ISSUER_FILE: &str = "issuer.keys";
/// File name of the Ed25519 public key (hex) inside a key directory.
pub const SIGNING_PUB_FILE: &str = "signing.pub";

/// The issuer key set a command reads: `--keys DIR` and `--passphrase-file` (`card …`,
/// `fare compile`).
#[derive(Args)]
pub struct KeyOpts {
    /// The issuer key directory (from `tapgate keys init`).
    #[arg(long)]
    pub keys: PathBuf,
    /// Read the key-set passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
    #[arg(long = "passphrase-file")]
    pub passphrase_file: Option<PathBuf>,
}

impl KeyOpts {
    /// The key set, unsealed ([`load_keyset`]).
    pub fn load(&self) -> Result<KeySet> {
        load_keyset(&self.keys, self.passphrase_file.as_deref())
    }
}

/// `tapgate keys`.
#[derive(Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    cmd: KeysCmd,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Print the AN10922 AES-128 diversified key (32 uppercase hex digits).
    Diversify {
        /// Master key, 16 bytes hex.
        #[arg(long)]
        master: String,
        /// Card UID, hex (typically 7 bytes).
        #[arg(long)]
        uid: String,
        /// Application identifier, hex (default: tapgate's 544701; "" for none).
        #[arg(long)]
        aid: Option<String>,
        /// System identifier, hex (default: ASCII "tapgate"; "" for none).
        #[arg(long = "system-id")]
        system_id: Option<String>,
    },
    /// Print the EV2 session keys SesAuthENC and SesAuthMAC.
    Session {
        /// The authentication key, 16 bytes hex.
        #[arg(long)]
        key: String,
        /// RndA, 16 bytes hex.
        #[arg(long = "rnd-a")]
        rnd_a: String,
        /// RndB, 16 bytes hex.
        #[arg(long = "rnd-b")]
        rnd_b: String,
    },
    /// Create a new issuer key set (all masters at version 1, an Ed25519 signing key).
    Init {
        /// Directory to create it in.
        #[arg(long)]
        out: PathBuf,
        /// Read the sealing passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
        #[arg(long = "passphrase-file")]
        passphrase_file: Option<PathBuf>,
        /// Overwrite an existing key set.
        #[arg(long)]
        force: bool,
    },
    /// Cut the key set of one device's role from the issuer key set (sealed with the same
    /// passphrase): a validator SAM gets KM_DEBIT and its own device key only.
    Provision {
        /// The issuer key directory.
        #[arg(long)]
        keys: PathBuf,
        /// The role to cut for.
        #[arg(long, value_enum)]
        role: ProvisionRole,
        /// The device id (validators and franchise terminals).
        #[arg(long, default_value_t = 0)]
        device: u32,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Read the sealing passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
        #[arg(long = "passphrase-file")]
        passphrase_file: Option<PathBuf>,
    },
    /// Add a new card-key version: fresh KM_APP, KM_DEBIT, KM_CREDIT and KM_TMAC one above the
    /// newest, beside the old ones (docs/key-rotation.md). Then re-import the HSM and
    /// re-provision the SAMs: they hold both versions; cards move to the new one at their next
    /// online load.
    ///
    /// `--signing`: a new Ed25519 list-signing key instead (the back office signs with it;
    /// devices accept both until `keys retire --signing`; signing.pub is rewritten).
    /// `--device-master`: a new KM_DEVICE version (validators provisioned afterwards MAC taps
    /// under it; gateways accept both until `keys retire --device-master`).
    Rotate {
        /// The issuer key directory (or key-set file).
        #[arg(long)]
        keys: PathBuf,
        /// Read the key-set passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
        #[arg(long = "passphrase-file")]
        passphrase_file: Option<PathBuf>,
        #[command(flatten)]
        which: WhichKey,
    },
    /// Retire an old card-key version: SAMs provisioned afterwards no longer hold it, and a
    /// validator refuses a card still on it (`key_version_retired`) until its next online load
    /// moves it. The HSM keeps it to move those cards and to clear their taps.
    ///
    /// `--signing`: retire a list-signing key version (lists signed by it are refused by
    /// devices given the new signing.pub); `--device-master`: retire a KM_DEVICE version (the
    /// gateway quarantines a tap MAC'd under it; re-provision the gateway's key set).
    Retire {
        /// The issuer key directory (or key-set file).
        #[arg(long)]
        keys: PathBuf,
        /// The version to retire (older than the current one).
        #[arg(long)]
        version: u8,
        /// Read the key-set passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
        #[arg(long = "passphrase-file")]
        passphrase_file: Option<PathBuf>,
        #[command(flatten)]
        which: WhichKey,
    },
    /// Import the HSM role's keys (every version of KM_APP, KM_DEBIT, KM_CREDIT, KM_TMAC,
    /// KM_DEVICE, the Ed25519 signing key) into a PKCS#11 token as sensitive, non-extractable
    /// objects labelled `<prefix>/KM_CREDIT/v1` etc. Prints one line per object: label and key
    /// check value, never the key. See docs/hsm.md.
    ImportHsm {
        /// The issuer key directory.
        #[arg(long)]
        keys: PathBuf,
        /// Read the key-set passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
        #[arg(long = "passphrase-file")]
        passphrase_file: Option<PathBuf>,
        /// The PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).
        #[arg(long)]
        module: PathBuf,
        /// The token's label.
        #[arg(long = "token-label", required_unless_present = "slot")]
        token_label: Option<String>,
        /// The token's slot id (instead of its label).
        #[arg(long)]
        slot: Option<u64>,
        /// Read the token user PIN from this file (its first line; the file must be the
        /// owner's alone: chmod 600).
        #[arg(long = "pin-file", required_unless_present = "pin_env")]
        pin_file: Option<PathBuf>,
        /// Read the token user PIN from this environment variable.
        #[arg(long = "pin-env", conflicts_with = "pin_file")]
        pin_env: Option<String>,
        /// Label prefix of tapgate's objects in the token.
        #[arg(long, default_value = tapgate_pkcs11::DEFAULT_PREFIX)]
        prefix: String,
        /// Overwrite objects that already carry these labels.
        #[arg(long)]
        replace: bool,
    },
}

/// Which key `keys rotate` / `keys retire` acts on (default: the card keys).
#[derive(Args, Clone, Copy)]
struct WhichKey {
    /// The back office's Ed25519 list-signing key (blocklists, action lists, fare tables).
    #[arg(long, conflicts_with = "device_master")]
    signing: bool,
    /// KM_DEVICE, the master of the device keys validators MAC taps with.
    #[arg(long = "device-master")]
    device_master: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProvisionRole {
    Validator,
    Franchise,
    Gateway,
}

/// `DIR/issuer.keys`, or a key file given directly.
fn keyset_path(dir_or_file: &Path) -> PathBuf {
    if dir_or_file.is_dir() {
        dir_or_file.join(ISSUER_FILE)
    } else {
        dir_or_file.to_path_buf()
    }
}

/// Loads and unseals `DIR/issuer.keys` (or a key file given directly).
pub fn load_keyset(dir_or_file: &Path, passphrase_file: Option<&Path>) -> Result<KeySet> {
    let path = keyset_path(dir_or_file);
    if !path.exists() {
        return Err(input_err(format!(
            "no key set at {}: run `tapgate keys init --out {}` (or point keys / --keys at an existing key set)",
            path.display(),
            dir_or_file.display()
        )));
    }
    let bytes =
        std::fs::read(&path).with_context(|| format!("reading key set {}", path.display()))?;
    let pass = passphrase(passphrase_file)?;
    KeySet::unseal(&bytes, &pass).with_context(|| format!("opening key set {}", path.display()))
}

/// The PIN source of `--pin-file` / `--pin-env` (the PIN itself is never an argument); read by
/// tapgate's one rule for secrets (docs/operations.md, "Secrets").
pub fn pin_source(
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
) -> Result<tapgate_pkcs11::PinSource> {
    match tapgate_pkcs11::PinSource::one_of(pin_file, pin_env) {
        Ok(Some(source)) => Ok(source),
        _ => Err(input_err(
            "give the token PIN's source: --pin-file FILE or --pin-env VAR",
        )),
    }
}

/// `keys rotate|retire --signing` / `--device-master`: what changed and what to do next.
fn rotate_signing_keys(ks: &mut KeySet, which: WhichKey, retire: Option<u8>) -> Result<String> {
    let rng = &mut rand::rngs::OsRng;
    let refused = |e: purse::keys::KeyError| input_err(e.to_string());
    Ok(match (which.signing, retire) {
        (true, None) => format!(
            "signing key rotated: version {} signs from now on; devices accept {:?} (signing.pub) until `keys retire --signing`",
            ks.rotate_signing(rng)?,
            ks.trusted_signing_keys().accepted_versions()
        ),
        (true, Some(v)) => {
            ks.retire_signing(v).map_err(refused)?;
            format!("signing-key version {v} retired: give devices the new signing.pub (`keys provision`)")
        }
        (false, None) => format!(
            "device master rotated: KM_DEVICE version {} added; re-provision the gateways, then each validator",
            ks.rotate_device_master(rng)?
        ),
        (false, Some(v)) => {
            ks.retire_device_master(v).map_err(refused)?;
            format!("device-master version {v} retired: re-provision the gateways; a tap MAC'd under it is quarantined")
        }
    })
}

/// `tapgate keys rotate` and `tapgate keys retire`: the issuer key set changed and sealed
/// again in place (atomically), what the operator does next printed.
fn rotation(
    keys: &Path,
    passphrase_file: Option<&Path>,
    retire: Option<u8>,
    which: WhichKey,
) -> Result<()> {
    let mut ks = load_keyset(keys, passphrase_file)?;
    if which.signing || which.device_master {
        let done = rotate_signing_keys(&mut ks, which, retire)?;
        let pass = passphrase(passphrase_file)?;
        let sealed = ks.seal(&pass, KdfParams::DEFAULT, &mut rand::rngs::OsRng)?;
        write_atomic(&keyset_path(keys), &sealed)?;
        if which.signing && keys.is_dir() {
            let text = ks.trusted_signing_keys().render();
            write_atomic(&keys.join(SIGNING_PUB_FILE), text.as_bytes())?;
        }
        println!("{done}");
        return Ok(());
    }
    let done = match retire {
        None => format!(
            "card keys rotated: version {} of app, debit, credit and tmac added",
            ks.rotate_card_keys(&mut rand::rngs::OsRng)?
        ),
        Some(v) => {
            ks.retire(v).map_err(|e| input_err(e.to_string()))?;
            format!("card-key version {v} retired")
        }
    };
    let pass = passphrase(passphrase_file)?;
    let sealed = ks.seal(&pass, KdfParams::DEFAULT, &mut rand::rngs::OsRng)?;
    write_atomic(&keyset_path(keys), &sealed)?;
    println!("{done}");
    println!(
        "  versions held: {:?}; retired: {:?}; cards move to version {}",
        ks.versions(purse::keys::KeyKind::Debit),
        ks.retired,
        ks.card_version().map_or("-".to_string(), |v| v.to_string())
    );
    println!("  next: `tapgate keys import-hsm --replace` (PKCS#11) or restart the charging server (software HSM), then `tapgate keys provision` for every validator and franchise SAM");
    Ok(())
}

/// Runs `tapgate keys …`.
pub fn run(args: KeysArgs) -> Result<()> {
    match args.cmd {
        KeysCmd::Rotate {
            keys,
            passphrase_file,
            which,
        } => rotation(&keys, passphrase_file.as_deref(), None, which)?,
        KeysCmd::Retire {
            keys,
            version,
            passphrase_file,
            which,
        } => rotation(&keys, passphrase_file.as_deref(), Some(version), which)?,
        KeysCmd::ImportHsm {
            keys,
            passphrase_file,
            module,
            token_label,
            slot,
            pin_file,
            pin_env,
            prefix,
            replace,
        } => {
            let cfg = tapgate_pkcs11::Pkcs11Config {
                module,
                token_label,
                slot,
                pin: pin_source(pin_file, pin_env)?,
                prefix,
            };
            let ks = load_keyset(&keys, passphrase_file.as_deref())?;
            let ts =
                tapgate_pkcs11::TokenSession::open(&cfg).map_err(|e| input_err(e.to_string()))?;
            let imported = tapgate_pkcs11::import::import_keyset(&ts, &ks, &cfg.prefix, replace)
                .map_err(|e| match e {
                    tapgate_pkcs11::Pkcs11Error::Exists { .. } => input_err(e.to_string()),
                    e => anyhow::Error::new(e).context("importing into the token"),
                })?;
            for i in &imported {
                println!("imported {} {}", i.label, i.check);
            }
            println!("{} objects in token {:?}", imported.len(), ts.token);
        }
        KeysCmd::Diversify {
            master,
            uid,
            aid,
            system_id,
        } => {
            let master = AesKey::from_bytes(hex16("--master", &master)?);
            let uid = hex_arg("--uid", &uid, &[4, 7, 10])?;
            let aid = match aid {
                Some(a) => hex_arg("--aid", &a, &[0, 3])?,
                None => DEFAULT_AID.to_vec(),
            };
            let sys = match system_id {
                Some(s) => hex_arg("--system-id", &s, &[])?,
                None => DEFAULT_SYSTEM_ID.to_vec(),
            };
            let key = crypto::diversify_an10922(&master, &uid, &aid, &sys)
                .map_err(|e| input_err(format!("diversification input: {e}")))?;
            println!("{}", hex::encode_upper(key.expose_secret()));
        }
        KeysCmd::Session { key, rnd_a, rnd_b } => {
            let key = AesKey::from_bytes(hex16("--key", &key)?);
            let a = hex16("--rnd-a", &rnd_a)?;
            let b = hex16("--rnd-b", &rnd_b)?;
            let s = crypto::ev2_session_keys(&key, &a, &b);
            println!("SesAuthENC={}", hex::encode_upper(s.enc.expose_secret()));
            println!("SesAuthMAC={}", hex::encode_upper(s.mac.expose_secret()));
        }
        KeysCmd::Init {
            out,
            passphrase_file,
            force,
        } => {
            let file = out.join(ISSUER_FILE);
            if file.exists() && !force {
                return Err(input_err(format!(
                    "{} already exists; pass --force to replace it (cards personalised under it become unusable)",
                    file.display()
                )));
            }
            let pass = passphrase(passphrase_file.as_deref())?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let mut rng = rand::rngs::OsRng;
            let ks = KeySet::generate(&mut rng);
            let sealed = ks.seal(&pass, KdfParams::DEFAULT, &mut rng)?;
            write_atomic(&file, &sealed)?;
            write_atomic(
                &out.join(SIGNING_PUB_FILE),
                format!("{}\n", hex::encode(ks.verifying_key)).as_bytes(),
            )?;
            println!("key set created: {}", file.display());
            for e in &ks.entries {
                println!("  {} master version {}", e.kind.name(), e.version);
            }
            println!("  ed25519 public key {}", hex::encode(ks.verifying_key));
        }
        KeysCmd::Provision {
            keys,
            role,
            device,
            out,
            passphrase_file,
        } => {
            let ks = load_keyset(&keys, passphrase_file.as_deref())?;
            let role = match role {
                ProvisionRole::Validator => Role::ValidatorSam,
                ProvisionRole::Franchise => Role::FranchiseSam,
                ProvisionRole::Gateway => Role::Gateway,
            };
            let cut = ks.for_role(role, device)?;
            let pass = passphrase(passphrase_file.as_deref())?;
            let sealed = cut.seal(&pass, KdfParams::DEFAULT, &mut rand::rngs::OsRng)?;
            write_atomic(&out, &sealed)?;
            // The public keys lists are accepted under, beside the key set (where a validator
            // reads signing.pub): every non-retired version, the retired ones marked.
            let signing_pub = out.with_file_name(SIGNING_PUB_FILE);
            write_atomic(&signing_pub, cut.trusted_signing_keys().render().as_bytes())?;
            println!(
                "provisioned {role:?} key set for device {device}: {} (and {})",
                out.display(),
                signing_pub.display()
            );
        }
    }
    Ok(())
}

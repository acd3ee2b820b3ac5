//! Threshold verification with keys made in-process (no ssh-keygen).

use jiff::tz::TimeZone;
use jiff::Timestamp;
use ssh_key::{HashAlg, LineEnding, PrivateKey};

use super::{keypair, public_line, MANIFEST};
use crate::signature::{
    evaluate, public_key_fingerprint, sign, verify_threshold, AllowedSigners, RawSignature,
    Rejection, SignatureError, SignatureOutcome, VerifyError, MAX_SIGNATURES, NAMESPACE,
};

fn now() -> Timestamp {
    "2026-06-01T12:00:00Z".parse().unwrap()
}

fn trust(text: &str) -> AllowedSigners {
    AllowedSigners::parse_with_time_zone(text, &TimeZone::UTC).unwrap()
}

fn signed(key: &PrivateKey) -> RawSignature {
    sign(MANIFEST, key, None).unwrap()
}

fn signed_as(key: &PrivateKey, signer: &str) -> RawSignature {
    sign(MANIFEST, key, Some(signer.to_string())).unwrap()
}

fn verify(
    sigs: &[RawSignature],
    allowed: &AllowedSigners,
    threshold: usize,
) -> Result<Vec<String>, VerifyError> {
    verify_threshold(MANIFEST, sigs, allowed, now(), threshold).map(|v| v.principals)
}

/// The single rejection of a 1-signature verification.
fn rejection(sig: RawSignature, allowed: &AllowedSigners) -> Rejection {
    match verify_threshold(MANIFEST, &[sig], allowed, now(), 1) {
        Err(VerifyError::BelowThreshold {
            valid: 0,
            required: 1,
            signatures,
            ..
        }) => signatures[0]
            .rejection()
            .cloned()
            .expect("a rejected signature"),
        other => panic!("expected one rejected signature, got {other:?}"),
    }
}

fn below(result: Result<Vec<String>, VerifyError>) -> (usize, usize, Vec<String>) {
    match result {
        Err(VerifyError::BelowThreshold {
            valid,
            required,
            principals,
            ..
        }) => (valid, required, principals),
        other => panic!("expected BelowThreshold, got {other:?}"),
    }
}

#[test]
fn one_of_one() {
    let alice = keypair(1);
    let allowed = trust(&format!("alice@example.com {}\n", public_line(&alice)));
    let v = verify_threshold(MANIFEST, &[signed(&alice)], &allowed, now(), 1).unwrap();
    assert_eq!(v.principals, vec!["alice@example.com"]);
    assert_eq!(v.threshold, 1);
    assert_eq!(
        v.signatures[0].outcome,
        SignatureOutcome::Trusted {
            principals: vec!["alice@example.com".into()],
            counted_as: Some("alice@example.com".into())
        }
    );
    assert_eq!(
        v.signatures[0].key_fingerprint.as_deref(),
        Some(
            alice
                .public_key()
                .fingerprint(HashAlg::Sha256)
                .to_string()
                .as_str()
        )
    );
    assert_eq!(
        v.signatures[0].key_algorithm.as_deref(),
        Some("ssh-ed25519")
    );
}

#[test]
fn two_of_two_distinct_principals() {
    let (alice, bob) = (keypair(1), keypair(2));
    let allowed = trust(&format!(
        "alice {}\nbob {}\n",
        public_line(&alice),
        public_line(&bob)
    ));
    let sigs = [signed(&bob), signed(&alice)];
    assert_eq!(
        verify(&sigs, &allowed, 2).unwrap(),
        vec!["alice", "bob"],
        "sorted"
    );
    assert_eq!(
        below(verify(&sigs, &allowed, 3)),
        (2, 3, vec!["alice".into(), "bob".into()])
    );
}

#[test]
fn same_key_twice_counts_once() {
    let alice = keypair(1);
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    let sigs = [signed(&alice), signed(&alice)];
    assert_eq!(
        below(verify(&sigs, &allowed, 2)),
        (1, 2, vec!["alice".into()])
    );
    let e = evaluate(MANIFEST, &sigs, &allowed, now());
    assert!(
        matches!(&e.signatures[0].outcome, SignatureOutcome::Trusted { counted_as: Some(p), .. } if p == "alice")
    );
    assert!(matches!(
        &e.signatures[1].outcome,
        SignatureOutcome::Trusted {
            counted_as: None,
            ..
        }
    ));
}

#[test]
fn two_keys_of_one_principal_count_once() {
    let (laptop, desktop) = (keypair(1), keypair(2));
    let allowed = trust(&format!(
        "alice {}\nalice {}\n",
        public_line(&laptop),
        public_line(&desktop)
    ));
    assert_eq!(
        below(verify(&[signed(&laptop), signed(&desktop)], &allowed, 2)),
        (1, 2, vec!["alice".into()])
    );
    // Same with both keys listed under a shared principal list on one line each.
    let allowed = trust(&format!(
        "alice,ops {}\nalice,ops {}\n",
        public_line(&laptop),
        public_line(&desktop)
    ));
    assert_eq!(
        verify(&[signed(&laptop), signed(&desktop)], &allowed, 2).unwrap(),
        vec!["alice", "ops"]
    );
}

#[test]
fn one_key_under_several_principals_counts_once() {
    let shared = keypair(1);
    let allowed = trust(&format!(
        "alice,bob {}\ncarol {}\n",
        public_line(&shared),
        public_line(&shared)
    ));
    // Signing three times, claiming different principals, is still one key.
    let sigs = [
        signed_as(&shared, "alice"),
        signed_as(&shared, "bob"),
        signed_as(&shared, "carol"),
        signed(&shared),
    ];
    assert_eq!(below(verify(&sigs, &allowed, 2)).0, 1);
}

#[test]
fn matching_reroutes_to_reach_the_maximum() {
    // k1 may be alice or bob, k2 only alice: a greedy count could give 1.
    let (k1, k2) = (keypair(1), keypair(2));
    let allowed = trust(&format!(
        "alice,bob {}\nalice {}\n",
        public_line(&k1),
        public_line(&k2)
    ));
    assert_eq!(
        verify(&[signed(&k1), signed(&k2)], &allowed, 2).unwrap(),
        vec!["alice", "bob"]
    );
}

#[test]
fn wrong_namespace() {
    let alice = keypair(1);
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    let sig = alice.sign("git", HashAlg::Sha512, MANIFEST).unwrap();
    let raw = RawSignature {
        armored: sig.to_pem(LineEnding::LF).unwrap(),
        signer: None,
    };
    assert_eq!(
        rejection(raw, &allowed),
        Rejection::WrongNamespace {
            namespace: "git".into()
        }
    );
}

#[test]
fn key_not_in_allowed_signers() {
    let (alice, mallory) = (keypair(1), keypair(66));
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    assert_eq!(
        rejection(signed(&mallory), &allowed),
        Rejection::KeyNotAllowed
    );
    // Claiming to be alice does not help.
    assert_eq!(
        rejection(signed_as(&mallory, "alice"), &allowed),
        Rejection::KeyNotAllowed
    );
    // Nor does an empty trust file.
    assert_eq!(
        rejection(signed(&alice), &trust("")),
        Rejection::KeyNotAllowed
    );
}

#[test]
fn expired_and_not_yet_valid_keys() {
    let alice = keypair(1);
    let pk = public_line(&alice);
    let expired = trust(&format!("alice valid-before=\"20260101Z\" {pk}\n"));
    assert_eq!(
        rejection(signed(&alice), &expired),
        Rejection::KeyExpired {
            line: 1,
            valid_before: "2026-01-01T00:00:00Z".parse().unwrap()
        }
    );
    let future = trust(&format!("alice valid-after=\"20270101Z\" {pk}\n"));
    assert_eq!(
        rejection(signed(&alice), &future),
        Rejection::KeyNotYetValid {
            line: 1,
            valid_after: "2027-01-01T00:00:00Z".parse().unwrap()
        }
    );
    let window = trust(&format!(
        "alice valid-after=\"20260101Z\",valid-before=\"20270101Z\" {pk}\n"
    ));
    assert_eq!(
        verify(&[signed(&alice)], &window, 1).unwrap(),
        vec!["alice"]
    );
}

#[test]
fn validity_bounds_are_inclusive_to_the_second() {
    let alice = keypair(1);
    let allowed = trust(&format!(
        "alice valid-after=\"20260601120000Z\",valid-before=\"20260601130000Z\" {}\n",
        public_line(&alice)
    ));
    let at = |t: &str| {
        verify_threshold(MANIFEST, &[signed(&alice)], &allowed, t.parse().unwrap(), 1).is_ok()
    };
    assert!(!at("2026-06-01T11:59:59.999Z"));
    assert!(at("2026-06-01T12:00:00Z"));
    assert!(at("2026-06-01T13:00:00Z"));
    assert!(
        at("2026-06-01T13:00:00.5Z"),
        "ssh-keygen compares whole seconds"
    );
    assert!(!at("2026-06-01T13:00:01Z"));
}

#[test]
fn namespaces_option() {
    let alice = keypair(1);
    let pk = public_line(&alice);
    assert_eq!(
        rejection(
            signed(&alice),
            &trust(&format!("alice namespaces=\"other\" {pk}\n"))
        ),
        Rejection::NamespaceNotAllowed { line: 1 }
    );
    assert_eq!(
        rejection(
            signed(&alice),
            &trust(&format!(
                "alice namespaces=\"rollguard-*,!rollguard-bundle\" {pk}\n"
            ))
        ),
        Rejection::NamespaceNotAllowed { line: 1 }
    );
    let ok = trust(&format!("alice namespaces=\"git,rollguard-*\" {pk}\n"));
    assert_eq!(verify(&[signed(&alice)], &ok, 1).unwrap(), vec!["alice"]);
}

#[test]
fn tampered_manifest() {
    let alice = keypair(1);
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    let sig = signed(&alice);
    for i in [0, MANIFEST.len() / 2, MANIFEST.len() - 1] {
        let mut tampered = MANIFEST.to_vec();
        tampered[i] ^= 0x01;
        let r = verify_threshold(&tampered, std::slice::from_ref(&sig), &allowed, now(), 1)
            .unwrap_err();
        assert_eq!(
            r.diagnostics()[0].rejection(),
            Some(&Rejection::BadSignature),
            "byte {i}"
        );
    }
    let mut longer = MANIFEST.to_vec();
    longer.push(b'\n');
    let r = verify_threshold(&longer, &[sig], &allowed, now(), 1).unwrap_err();
    assert_eq!(
        r.diagnostics()[0].rejection(),
        Some(&Rejection::BadSignature),
        "a trailing newline matters"
    );
}

#[test]
fn tampered_signature_bytes() {
    let alice = keypair(1);
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    let armored = signed(&alice).armored;
    // Flip one base64 character inside the signature blob (the end of the body).
    let lines: Vec<&str> = armored.lines().collect();
    let last_body = lines[lines.len() - 2];
    let mut changed = last_body.to_string();
    let pos = changed.len() / 2;
    let c = changed.as_bytes()[pos];
    changed.replace_range(pos..pos + 1, if c == b'A' { "B" } else { "A" });
    let tampered = armored.replace(last_body, &changed);
    let r = rejection(
        RawSignature {
            armored: tampered,
            signer: None,
        },
        &allowed,
    );
    assert!(
        matches!(r, Rejection::BadSignature | Rejection::BadArmor { .. }),
        "{r:?}"
    );
}

#[test]
fn garbage_armor() {
    let allowed = trust(&format!("alice {}\n", public_line(&keypair(1))));
    let armored = signed(&keypair(1)).armored;
    for garbage in [
        String::new(),
        "hello".to_string(),
        "-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n".to_string(),
        armored.replace("SSH SIGNATURE", "PGP SIGNATURE"),
        armored[..armored.len() / 2].to_string(),
        "x".repeat(100_000),
    ] {
        let r = rejection(
            RawSignature {
                armored: garbage.clone(),
                signer: None,
            },
            &allowed,
        );
        assert!(
            matches!(r, Rejection::BadArmor { .. }),
            "{garbage:.40?}: {r:?}"
        );
    }
}

#[test]
fn threshold_zero_and_empty_and_too_many() {
    let alice = keypair(1);
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    assert_eq!(
        verify(&[signed(&alice)], &allowed, 0),
        Err(VerifyError::ZeroThreshold)
    );
    assert_eq!(
        verify(&[], &allowed, 0),
        Err(VerifyError::ZeroThreshold),
        "configuration error first"
    );
    assert_eq!(verify(&[], &allowed, 1), Err(VerifyError::NoSignatures));
    let many = vec![signed(&alice); MAX_SIGNATURES + 1];
    assert_eq!(
        verify(&many, &allowed, 1),
        Err(VerifyError::TooManySignatures {
            count: MAX_SIGNATURES + 1
        })
    );
    let e = evaluate(MANIFEST, &many, &allowed, now());
    assert_eq!(e.principals, vec!["alice"]);
    assert_eq!(
        e.signatures[MAX_SIGNATURES].rejection(),
        Some(&Rejection::NotExamined)
    );
}

#[test]
fn cert_authority_entries_never_match_plain_keys() {
    let alice = keypair(1);
    let allowed = trust(&format!("alice cert-authority {}\n", public_line(&alice)));
    assert_eq!(
        rejection(signed(&alice), &allowed),
        Rejection::CertAuthorityOnly { line: 1 }
    );
    assert_eq!(
        rejection(signed_as(&alice, "alice"), &allowed),
        Rejection::CertAuthorityOnly { line: 1 }
    );
}

#[test]
fn wildcard_principals_need_a_matching_claim() {
    let (k1, k2) = (keypair(1), keypair(2));
    let allowed = trust(&format!(
        "*@example.com,!mallory@example.com {}\n*@example.com {}\n",
        public_line(&k1),
        public_line(&k2)
    ));
    assert_eq!(
        rejection(signed(&k1), &allowed),
        Rejection::SignerRequired { line: 1 }
    );
    assert_eq!(
        rejection(signed_as(&k1, "mallory@example.com"), &allowed),
        Rejection::SignerNotListed {
            signer: "mallory@example.com".into()
        }
    );
    assert_eq!(
        rejection(signed_as(&k1, "alice@example.org"), &allowed),
        Rejection::SignerNotListed {
            signer: "alice@example.org".into()
        }
    );
    // One pattern-vouched signature counts, named by its claim and pattern.
    assert_eq!(
        verify(&[signed_as(&k2, "bob@example.com")], &allowed, 1).unwrap(),
        vec!["bob@example.com (by pattern *@example.com)"]
    );
}

/// Two keys vouched for only by `*@example.com` lines may be one person's:
/// claiming two names does not make two signers.
#[test]
fn keys_vouched_for_by_wildcards_count_once() {
    let (k1, k2, k3) = (keypair(1), keypair(2), keypair(3));
    let allowed = trust(&format!(
        "*@example.com {}
*@example.com {}
*@example.org {}
",
        public_line(&k1),
        public_line(&k2),
        public_line(&k3)
    ));
    let sigs = [
        signed_as(&k1, "alice@example.com"),
        signed_as(&k2, "bob@example.com"),
    ];
    let (valid, required, principals) = below(verify(&sigs, &allowed, 2));
    assert_eq!((valid, required), (1, 2));
    assert_eq!(
        principals,
        vec!["alice@example.com (by pattern *@example.com)"]
    );
    // Different patterns do not help either: all of them are one identity.
    let sigs = [
        signed_as(&k1, "alice@example.com"),
        signed_as(&k3, "bob@example.org"),
    ];
    assert_eq!(below(verify(&sigs, &allowed, 2)).0, 1);
    // The same key claiming two names is one key, as before.
    let sigs = [
        signed_as(&k1, "alice@example.com"),
        signed_as(&k1, "bob@example.com"),
    ];
    assert_eq!(below(verify(&sigs, &allowed, 2)).0, 1);
}

/// A named principal and a pattern that matches that name may be the same
/// person: the pattern's signature does not add a second signer. A pattern
/// that cannot be the named principal does.
#[test]
fn a_wildcard_key_is_not_a_second_signer_beside_a_name_it_matches() {
    let (alice, other, outsider) = (keypair(1), keypair(2), keypair(3));
    let allowed = trust(&format!(
        "alice@example.com {}
*@example.com {}
*@partner.org {}
",
        public_line(&alice),
        public_line(&other),
        public_line(&outsider)
    ));
    let sigs = [signed(&alice), signed_as(&other, "bob@example.com")];
    assert_eq!(
        below(verify(&sigs, &allowed, 2)),
        (1, 2, vec!["alice@example.com".to_string()])
    );
    let sigs = [signed(&alice), signed_as(&outsider, "carol@partner.org")];
    assert_eq!(
        verify(&sigs, &allowed, 2).unwrap(),
        vec![
            "alice@example.com",
            "carol@partner.org (by pattern *@partner.org)"
        ]
    );
}

#[test]
fn a_claim_restricts_candidates() {
    let (k1, k2) = (keypair(1), keypair(2));
    let allowed = trust(&format!(
        "alice,bob {}\nbob {}\n",
        public_line(&k1),
        public_line(&k2)
    ));
    // k1 claims bob, so it cannot also be alice: only one distinct principal.
    let sigs = [signed_as(&k1, "bob"), signed(&k2)];
    assert_eq!(
        below(verify(&sigs, &allowed, 2)),
        (1, 2, vec!["bob".into()])
    );
    // Without the claim k1 can be alice: two.
    assert_eq!(
        verify(&[signed(&k1), signed(&k2)], &allowed, 2).unwrap(),
        vec!["alice", "bob"]
    );
    // A claim the key is not listed for.
    assert_eq!(
        rejection(signed_as(&k2, "alice"), &allowed),
        Rejection::SignerNotListed {
            signer: "alice".into()
        }
    );
}

#[test]
fn invalid_claims_are_rejected_and_unsignable() {
    let alice = keypair(1);
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    for bad in [
        "",
        "al ice",
        "a,b",
        "a\"b",
        "*",
        "al?ce",
        "!alice",
        "a\u{7}",
        &"a".repeat(257),
    ] {
        let mut raw = signed(&alice);
        raw.signer = Some(bad.to_string());
        let e = evaluate(MANIFEST, std::slice::from_ref(&raw), &allowed, now());
        assert!(
            e.signatures[0].key_fingerprint.is_some(),
            "the key is still named"
        );
        assert!(
            matches!(rejection(raw, &allowed), Rejection::InvalidSigner { .. }),
            "{bad:?}"
        );
        assert!(
            matches!(
                sign(MANIFEST, &alice, Some(bad.to_string())),
                Err(SignatureError::Principal(_))
            ),
            "{bad:?}"
        );
    }
    assert!(sign(MANIFEST, &alice, Some("a".repeat(256))).is_ok());
    assert!(
        sign(MANIFEST, &alice, Some("ålice@例え.jp".into())).is_ok(),
        "non-ASCII printable is fine"
    );
}

#[test]
fn most_informative_rejection_across_entries() {
    let alice = keypair(1);
    let pk = public_line(&alice);
    // One entry excludes the namespace, a later one is expired: the expired
    // one got further, so that is the reason shown.
    let allowed = trust(&format!(
        "alice namespaces=\"git\" {pk}\nalice valid-before=\"20250101Z\" {pk}\n"
    ));
    assert!(matches!(
        rejection(signed(&alice), &allowed),
        Rejection::KeyExpired { line: 2, .. }
    ));
    // Any good entry wins over bad ones.
    let allowed = trust(&format!(
        "alice valid-before=\"20250101Z\" {pk}\nalice {pk}\n"
    ));
    assert_eq!(
        verify(&[signed(&alice)], &allowed, 1).unwrap(),
        vec!["alice"]
    );
}

#[test]
fn rejected_signatures_do_not_spoil_valid_ones() {
    let (alice, bob, mallory) = (keypair(1), keypair(2), keypair(66));
    let allowed = trust(&format!(
        "alice {}\nbob {}\n",
        public_line(&alice),
        public_line(&bob)
    ));
    let garbage = RawSignature {
        armored: "junk".into(),
        signer: None,
    };
    let sigs = [garbage, signed(&mallory), signed(&alice), signed(&bob)];
    let v = verify_threshold(MANIFEST, &sigs, &allowed, now(), 2).unwrap();
    assert_eq!(v.principals, vec!["alice", "bob"]);
    assert_eq!(v.signatures.len(), 4);
    assert!(v.signatures[0].rejection().is_some() && v.signatures[1].rejection().is_some());
}

#[test]
fn below_threshold_message_lists_each_reason() {
    let (alice, mallory) = (keypair(1), keypair(66));
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    let sigs = [
        signed(&alice),
        signed(&alice),
        signed(&mallory),
        RawSignature {
            armored: "junk".into(),
            signer: None,
        },
    ];
    let e = verify_threshold(MANIFEST, &sigs, &allowed, now(), 2).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("1 valid distinct signer(s) (alice), 2 required"),
        "{msg}"
    );
    assert!(msg.contains("signature #2"), "{msg}");
    assert!(msg.contains("already counted"), "{msg}");
    assert!(
        msg.contains("signature #3") && msg.contains("not in allowed_signers"),
        "{msg}"
    );
    assert!(
        msg.contains("signature #4") && msg.contains("not a readable SSH signature"),
        "{msg}"
    );
    assert!(
        !msg.contains("signature #1"),
        "the counted signature is not a problem: {msg}"
    );
}

#[test]
fn diagnostics_json_shape() {
    let (alice, mallory) = (keypair(1), keypair(66));
    let allowed = trust(&format!(
        "alice valid-before=\"20260101Z\" {}\n",
        public_line(&alice)
    ));
    let sigs = [signed_as(&alice, "alice"), signed(&mallory)];
    let e = evaluate(MANIFEST, &sigs, &allowed, now());
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["principals"], serde_json::json!([]));
    let first = &v["signatures"][0];
    assert_eq!(first["index"], 0);
    assert_eq!(first["claimed_signer"], "alice");
    assert_eq!(first["status"], "rejected");
    assert_eq!(first["reason"]["kind"], "key_expired");
    assert_eq!(first["reason"]["line"], 1);
    assert_eq!(first["reason"]["valid_before"], "2026-01-01T00:00:00Z");
    assert!(first["message"].as_str().unwrap().contains("expired"));
    assert!(first["key_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("SHA256:"));
    assert_eq!(v["signatures"][1]["reason"]["kind"], "key_not_allowed");
    let back: crate::signature::Evaluation = serde_json::from_value(v).unwrap();
    assert_eq!(back, e);

    let ok = trust(&format!("alice {}\n", public_line(&alice)));
    let v = serde_json::to_value(evaluate(MANIFEST, &sigs[..1], &ok, now())).unwrap();
    assert_eq!(v["signatures"][0]["status"], "trusted");
    assert_eq!(
        v["signatures"][0]["principals"],
        serde_json::json!(["alice"])
    );
    assert_eq!(v["signatures"][0]["counted_as"], "alice");
}

#[test]
fn sign_output_format() {
    let alice = keypair(1);
    let raw = signed_as(&alice, "alice");
    assert_eq!(raw.signer.as_deref(), Some("alice"));
    let a = &raw.armored;
    assert!(a.starts_with("-----BEGIN SSH SIGNATURE-----\n"), "{a}");
    assert!(a.ends_with("\n-----END SSH SIGNATURE-----\n"), "{a:?}");
    assert!(!a.contains('\r'));
    let body: Vec<&str> = a.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        body[..body.len() - 1].iter().all(|l| l.len() == 70),
        "70-column wrapping"
    );
    assert!(body.last().unwrap().len() <= 70);
    // ed25519 is deterministic: the same bytes sign the same way.
    assert_eq!(signed(&alice).armored, raw.armored);
    assert_eq!(
        public_key_fingerprint(&raw).unwrap(),
        alice.public_key().fingerprint(HashAlg::Sha256).to_string()
    );
    assert!(matches!(
        public_key_fingerprint(&RawSignature {
            armored: "x".into(),
            signer: None
        }),
        Err(SignatureError::Armor(_))
    ));
    // The namespace inside is ours.
    let parsed = ssh_key::SshSig::from_pem(a).unwrap();
    assert_eq!(parsed.namespace(), NAMESPACE);
    assert_eq!(parsed.hash_alg(), HashAlg::Sha512);
}

#[test]
fn sha256_signatures_are_accepted_too() {
    // ssh-keygen may be told `-O hashalg=sha256`; OpenSSH accepts both.
    let alice = keypair(1);
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    let sig = alice.sign(NAMESPACE, HashAlg::Sha256, MANIFEST).unwrap();
    let raw = RawSignature {
        armored: sig.to_pem(LineEnding::LF).unwrap(),
        signer: None,
    };
    assert_eq!(verify(&[raw], &allowed, 1).unwrap(), vec!["alice"]);
}

#[test]
fn verify_never_panics_on_mangled_armor() {
    // Deterministic single-byte mutations of a valid signature.
    let alice = keypair(1);
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    let armored = signed(&alice).armored.into_bytes();
    let mut accepted = 0;
    for i in 0..armored.len() {
        for delta in [1u8, 0x20, 0x80] {
            let mut m = armored.clone();
            m[i] = m[i].wrapping_add(delta);
            let raw = RawSignature {
                armored: String::from_utf8_lossy(&m).into_owned(),
                signer: None,
            };
            if verify_threshold(MANIFEST, &[raw], &allowed, now(), 1).is_ok() {
                accepted += 1;
            }
        }
    }
    // `ssh-key` alone accepts some of these (it does not insist that the
    // length prefixes of nested fields are exact); the canonical-encoding
    // check in `sshsig::parse` must turn every one of them away.
    assert_eq!(accepted, 0);
}

#[test]
fn armor_line_endings_are_tolerated_but_not_other_layouts() {
    let alice = keypair(1);
    let allowed = trust(&format!("alice {}\n", public_line(&alice)));
    let armored = signed(&alice).armored;
    let variants = [
        armored.replace('\n', "\r\n"),
        armored.trim_end().to_string(),
    ];
    for text in variants {
        let raw = RawSignature {
            armored: text.clone(),
            signer: None,
        };
        assert_eq!(
            verify(&[raw], &allowed, 1).unwrap(),
            vec!["alice"],
            "{text:?}"
        );
    }
    // Re-wrapped at 64 columns, or with blank lines: not the text ssh-keygen writes.
    let body: String = armored
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let rewrapped = format!(
        "-----BEGIN SSH SIGNATURE-----\n{}\n-----END SSH SIGNATURE-----\n",
        body.as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    );
    for text in [rewrapped, format!("{armored}\n\n"), format!("\n{armored}")] {
        let raw = RawSignature {
            armored: text.clone(),
            signer: None,
        };
        assert!(
            matches!(rejection(raw, &allowed), Rejection::BadArmor { .. }),
            "{text:?}"
        );
    }
}

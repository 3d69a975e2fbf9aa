//! Criterion benches of purse's functions: the primitives a debit is made of.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use purse::crypto::{cmac, diversify_an10922, ev2_session_keys, AesKey};

fn primitives(c: &mut Criterion) {
    let key = AesKey::from_bytes([0x2b; 16]);
    let msg = [0x6bu8; 32];
    c.bench_function("cmac_32_bytes", |b| b.iter(|| cmac(&key, black_box(&msg))));
    c.bench_function("an10922_diversify", |b| {
        b.iter(|| {
            diversify_an10922(
                &key,
                black_box(&[4, 0x78, 0x2E, 0x21, 0x80, 0x1D, 0x80]),
                &[0x30, 0x42, 0xF5],
                b"NXP Abu",
            )
        })
    });
    c.bench_function("ev2_session_keys", |b| {
        b.iter(|| ev2_session_keys(&key, black_box(&[1; 16]), black_box(&[2; 16])))
    });
}

criterion_group!(benches, primitives);
criterion_main!(benches);

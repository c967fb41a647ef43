#ifndef CWIREGUARD_H
#define CWIREGUARD_H
// WireGuard's primitives from Debian's libraries, prefixed cwg_: OpenSSL 3's
// libcrypto (X25519, ChaCha20-Poly1305, BLAKE2s-256, HMAC-BLAKE2s, keyed
// BLAKE2s) and libsodium (XChaCha20-Poly1305, which libcrypto lacks). No
// cryptography is implemented here: each function calls one library routine.
// Every function returns 1 on success and 0 on failure (a failed tag check,
// a library error), as libcrypto does.
#include <stddef.h>
#include <stdint.h>

// Loads the algorithms once (libcrypto's fetches, sodium_init). Safe to call
// from any thread, any number of times; the other functions call it.
int cwg_init(void);

// ---- randomness and memory ----
int cwg_random(uint8_t *out, size_t length);
// Zeroes memory in a way the compiler cannot drop (OPENSSL_cleanse).
void cwg_wipe(void *memory, size_t length);
// Constant-time comparison: 1 when equal.
int cwg_equal(const void *a, const void *b, size_t length);

// ---- X25519 (RFC 7748) ----
int cwg_x25519_public(uint8_t public_key[32], const uint8_t private_key[32]);
// Fails when the shared point is all zeros (a low-order public key).
int cwg_x25519(uint8_t shared[32], const uint8_t private_key[32], const uint8_t public_key[32]);

// ---- BLAKE2s ----
// BLAKE2s-256 of a || b (either may be empty).
int cwg_blake2s256(uint8_t out[32], const uint8_t *a, size_t a_length, const uint8_t *b, size_t b_length);
// HMAC-BLAKE2s-256 (RFC 2104 over BLAKE2s-256) of a || b.
int cwg_hmac_blake2s(uint8_t out[32], const uint8_t key[32], const uint8_t *a, size_t a_length,
                     const uint8_t *b, size_t b_length);
// Keyed BLAKE2s (BLAKE2s' own keyed mode) with an output of out_length bytes
// (16 for WireGuard's mac1/mac2, 32 for the reference vectors).
int cwg_blake2s_mac(uint8_t *out, size_t out_length, const uint8_t *key, size_t key_length,
                    const uint8_t *data, size_t data_length);

// ---- ChaCha20-Poly1305 (RFC 8439) ----
// One cipher context, reused for every message: it is created once with the
// cipher set, and each call only sets key and nonce (no allocation). A
// context serves one thread at a time.
typedef struct cwg_aead cwg_aead;
// The fastest path there is: the provider's implementation called directly
// (CWG_AEAD_DIRECT), else through EVP (CWG_AEAD_EVP).
cwg_aead *cwg_aead_new(void);
enum { CWG_AEAD_FASTEST = 0, CWG_AEAD_DIRECT = 1, CWG_AEAD_EVP = 2 };
// A context on the given path; NULL when that path is not available.
cwg_aead *cwg_aead_new_using(int path);
// Whether the context calls the provider's implementation directly.
int cwg_aead_is_direct(const cwg_aead *context);
void cwg_aead_free(cwg_aead *context);
// Clears the key and state the context holds from its last use.
int cwg_aead_wipe(cwg_aead *context);
// Seals length bytes from in to out (in == out is allowed) and writes the
// 16-byte tag to tag.
int cwg_aead_seal(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12],
                  const uint8_t *aad, size_t aad_length, const uint8_t *in, uint8_t *out, size_t length,
                  uint8_t tag[16]);
// Seals a transport payload given in two pieces (a then b, either may be empty)
// followed by `padding` zero bytes, writing the ciphertext to out (a_length +
// b_length + padding bytes, not overlapping the pieces) and the tag: one pass
// that copies and encrypts at once. No additional data.
int cwg_aead_seal_parts(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *a,
                        size_t a_length, const uint8_t *b, size_t b_length, size_t padding, uint8_t *out,
                        uint8_t tag[16]);
// Opens length bytes (without the tag) from in to out (in == out allowed) and
// checks the tag. On failure out holds garbage the caller must not use.
int cwg_aead_open(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12],
                  const uint8_t *aad, size_t aad_length, const uint8_t *in, uint8_t *out, size_t length,
                  const uint8_t tag[16]);

// ---- XChaCha20-Poly1305 (libsodium, the IETF construction) ----
// out receives length + 16 bytes (ciphertext then tag).
int cwg_xaead_seal(uint8_t *out, const uint8_t *in, size_t length, const uint8_t *aad, size_t aad_length,
                   const uint8_t nonce[24], const uint8_t key[32]);
// in holds length bytes of ciphertext followed by the 16-byte tag.
int cwg_xaead_open(uint8_t *out, const uint8_t *in, size_t length, const uint8_t *aad, size_t aad_length,
                   const uint8_t nonce[24], const uint8_t key[32]);

#endif

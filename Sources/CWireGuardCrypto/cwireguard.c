#include "cwireguard.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>

// Algorithms fetched once: an implicit fetch (EVP_blake2s256(), a name
// lookup per EVP_MAC_fetch) would search the provider store on every call.
static EVP_MD *blake2s256;
static EVP_MAC *hmac;
static EVP_MAC *blake2s_mac;
static const EVP_CIPHER *chacha20_poly1305;
static int ready;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void load(void) {
    blake2s256 = EVP_MD_fetch(NULL, "BLAKE2S-256", NULL);
    hmac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    blake2s_mac = EVP_MAC_fetch(NULL, "BLAKE2SMAC", NULL);
    chacha20_poly1305 = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    ready = blake2s256 && hmac && blake2s_mac && chacha20_poly1305 && sodium_init() >= 0;
}

int cwg_init(void) {
    pthread_once(&once, load);
    return ready;
}

int cwg_random(uint8_t *out, size_t length) {
    if (!cwg_init()) return 0;
    return RAND_bytes(out, (int)length) == 1;
}

void cwg_wipe(void *memory, size_t length) { OPENSSL_cleanse(memory, length); }

int cwg_equal(const void *a, const void *b, size_t length) { return CRYPTO_memcmp(a, b, length) == 0; }

int cwg_x25519_public(uint8_t public_key[32], const uint8_t private_key[32]) {
    if (!cwg_init()) return 0;
    EVP_PKEY *key = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, private_key, 32);
    if (!key) return 0;
    size_t length = 32;
    int ok = EVP_PKEY_get_raw_public_key(key, public_key, &length) == 1 && length == 32;
    EVP_PKEY_free(key);
    return ok;
}

int cwg_x25519(uint8_t shared[32], const uint8_t private_key[32], const uint8_t public_key[32]) {
    if (!cwg_init()) return 0;
    int ok = 0;
    EVP_PKEY *mine = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, private_key, 32);
    EVP_PKEY *theirs = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, public_key, 32);
    EVP_PKEY_CTX *context = mine ? EVP_PKEY_CTX_new(mine, NULL) : NULL;
    size_t length = 32;
    // libcrypto's X25519 derive fails on an all-zero result (RFC 7748 §6.1).
    if (context && theirs && EVP_PKEY_derive_init(context) == 1 && EVP_PKEY_derive_set_peer(context, theirs) == 1 &&
        EVP_PKEY_derive(context, shared, &length) == 1 && length == 32)
        ok = 1;
    EVP_PKEY_CTX_free(context);
    EVP_PKEY_free(theirs);
    EVP_PKEY_free(mine);
    if (!ok) OPENSSL_cleanse(shared, 32);
    return ok;
}

int cwg_blake2s256(uint8_t out[32], const uint8_t *a, size_t a_length, const uint8_t *b, size_t b_length) {
    if (!cwg_init()) return 0;
    EVP_MD_CTX *context = EVP_MD_CTX_new();
    unsigned int length = 0;
    int ok = context && EVP_DigestInit_ex(context, blake2s256, NULL) == 1 &&
             (a_length == 0 || EVP_DigestUpdate(context, a, a_length) == 1) &&
             (b_length == 0 || EVP_DigestUpdate(context, b, b_length) == 1) &&
             EVP_DigestFinal_ex(context, out, &length) == 1 && length == 32;
    EVP_MD_CTX_free(context);
    return ok;
}

static int mac(EVP_MAC *algorithm, const OSSL_PARAM *params, uint8_t *out, size_t out_length, const uint8_t *key,
               size_t key_length, const uint8_t *a, size_t a_length, const uint8_t *b, size_t b_length) {
    EVP_MAC_CTX *context = EVP_MAC_CTX_new(algorithm);
    size_t length = 0;
    int ok = context && EVP_MAC_init(context, key, key_length, params) == 1 &&
             (a_length == 0 || EVP_MAC_update(context, a, a_length) == 1) &&
             (b_length == 0 || EVP_MAC_update(context, b, b_length) == 1) &&
             EVP_MAC_final(context, out, &length, out_length) == 1 && length == out_length;
    EVP_MAC_CTX_free(context);  // cleanses the key copy
    return ok;
}

int cwg_hmac_blake2s(uint8_t out[32], const uint8_t key[32], const uint8_t *a, size_t a_length, const uint8_t *b,
                     size_t b_length) {
    if (!cwg_init()) return 0;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "BLAKE2S-256", 0),
        OSSL_PARAM_construct_end(),
    };
    return mac(hmac, params, out, 32, key, 32, a, a_length, b, b_length);
}

int cwg_blake2s_mac(uint8_t *out, size_t out_length, const uint8_t *key, size_t key_length, const uint8_t *data,
                    size_t data_length) {
    if (!cwg_init() || out_length == 0 || out_length > 32) return 0;
    size_t size = out_length;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_size_t(OSSL_MAC_PARAM_SIZE, &size),
        OSSL_PARAM_construct_end(),
    };
    return mac(blake2s_mac, params, out, out_length, key, key_length, data, data_length, NULL, 0);
}

struct cwg_aead {
    EVP_CIPHER_CTX *encrypt;
    EVP_CIPHER_CTX *decrypt;
};

static int aead_setup(cwg_aead *context) {
    return EVP_EncryptInit_ex(context->encrypt, chacha20_poly1305, NULL, NULL, NULL) == 1 &&
           EVP_DecryptInit_ex(context->decrypt, chacha20_poly1305, NULL, NULL, NULL) == 1;
}

cwg_aead *cwg_aead_new(void) {
    if (!cwg_init()) return NULL;
    cwg_aead *context = calloc(1, sizeof *context);
    if (!context) return NULL;
    context->encrypt = EVP_CIPHER_CTX_new();
    context->decrypt = EVP_CIPHER_CTX_new();
    if (!context->encrypt || !context->decrypt || !aead_setup(context)) {
        cwg_aead_free(context);
        return NULL;
    }
    return context;
}

void cwg_aead_free(cwg_aead *context) {
    if (!context) return;
    EVP_CIPHER_CTX_free(context->encrypt);  // cleanses the key schedule
    EVP_CIPHER_CTX_free(context->decrypt);
    free(context);
}

int cwg_aead_wipe(cwg_aead *context) {
    EVP_CIPHER_CTX_reset(context->encrypt);
    EVP_CIPHER_CTX_reset(context->decrypt);
    return aead_setup(context);
}

int cwg_aead_seal(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                  size_t aad_length, const uint8_t *in, uint8_t *out, size_t length, uint8_t tag[16]) {
    EVP_CIPHER_CTX *c = context->encrypt;
    int written = 0;
    // The cipher stays set from cwg_aead_new: this only loads key and nonce.
    if (EVP_EncryptInit_ex(c, NULL, NULL, key, nonce) != 1) return 0;
    if (aad_length && EVP_EncryptUpdate(c, NULL, &written, aad, (int)aad_length) != 1) return 0;
    if (length && EVP_EncryptUpdate(c, out, &written, in, (int)length) != 1) return 0;
    if (EVP_EncryptFinal_ex(c, out + length, &written) != 1) return 0;
    return EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, 16, tag) == 1;
}

// Every update of this stream cipher writes as many bytes as it reads; checked,
// so that a provider that buffered would fail loudly instead of sealing garbage.
static int seal_piece(EVP_CIPHER_CTX *c, uint8_t *out, const uint8_t *in, size_t length) {
    int written = 0;
    if (length == 0) return 1;
    return EVP_EncryptUpdate(c, out, &written, in, (int)length) == 1 && (size_t)written == length;
}

int cwg_aead_seal_parts(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *a,
                        size_t a_length, const uint8_t *b, size_t b_length, size_t padding, uint8_t *out,
                        uint8_t tag[16]) {
    static const uint8_t zeros[16];
    EVP_CIPHER_CTX *c = context->encrypt;
    int written = 0;
    if (padding > sizeof zeros) return 0;
    if (EVP_EncryptInit_ex(c, NULL, NULL, key, nonce) != 1) return 0;
    if (!seal_piece(c, out, a, a_length) || !seal_piece(c, out + a_length, b, b_length) ||
        !seal_piece(c, out + a_length + b_length, zeros, padding))
        return 0;
    if (EVP_EncryptFinal_ex(c, out + a_length + b_length + padding, &written) != 1) return 0;
    return EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, 16, tag) == 1;
}

int cwg_aead_open(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                  size_t aad_length, const uint8_t *in, uint8_t *out, size_t length, const uint8_t tag[16]) {
    EVP_CIPHER_CTX *c = context->decrypt;
    int written = 0;
    if (EVP_DecryptInit_ex(c, NULL, NULL, key, nonce) != 1) return 0;
    if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, 16, (void *)tag) != 1) return 0;
    if (aad_length && EVP_DecryptUpdate(c, NULL, &written, aad, (int)aad_length) != 1) return 0;
    if (length && EVP_DecryptUpdate(c, out, &written, in, (int)length) != 1) return 0;
    return EVP_DecryptFinal_ex(c, out + length, &written) == 1;
}

int cwg_xaead_seal(uint8_t *out, const uint8_t *in, size_t length, const uint8_t *aad, size_t aad_length,
                   const uint8_t nonce[24], const uint8_t key[32]) {
    if (!cwg_init()) return 0;
    unsigned long long written = 0;
    return crypto_aead_xchacha20poly1305_ietf_encrypt(out, &written, in, length, aad, aad_length, NULL, nonce,
                                                      key) == 0;
}

int cwg_xaead_open(uint8_t *out, const uint8_t *in, size_t length, const uint8_t *aad, size_t aad_length,
                   const uint8_t nonce[24], const uint8_t key[32]) {
    if (!cwg_init()) return 0;
    unsigned long long written = 0;
    return crypto_aead_xchacha20poly1305_ietf_decrypt(out, &written, NULL, in, length + 16, aad, aad_length, nonce,
                                                      key) == 0;
}

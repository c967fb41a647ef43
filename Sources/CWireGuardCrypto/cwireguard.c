#include "cwireguard.h"

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>
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

// The transport AEAD is called through its provider's dispatch table, the
// public interface EVP itself calls (provider-cipher(7)): for a 1420-byte
// message OpenSSL 3.0's EVP layer adds about a fifth to the cipher's own time
// (key and IV lengths asked through OSSL_PARAM lookups on every init, the
// tag through ctrl translated into parameters). The implementation is the
// same one EVP_CIPHER_fetch chose, from the same provider.
static struct {
    OSSL_FUNC_cipher_newctx_fn *newctx;
    OSSL_FUNC_cipher_freectx_fn *freectx;
    OSSL_FUNC_cipher_encrypt_init_fn *encrypt_init;
    OSSL_FUNC_cipher_decrypt_init_fn *decrypt_init;
    OSSL_FUNC_cipher_update_fn *update;
    OSSL_FUNC_cipher_final_fn *final;
    OSSL_FUNC_cipher_get_ctx_params_fn *get_ctx_params;
    OSSL_FUNC_cipher_set_ctx_params_fn *set_ctx_params;
    void *provider_context;
} direct;
static int have_direct;

// Whether the colon-separated list of algorithm names holds `name`.
static int names_hold(const char *names, const char *name) {
    size_t length = strlen(name);
    for (const char *p = names; p && *p;) {
        const char *end = strchr(p, ':');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == length && OPENSSL_strncasecmp(p, name, n) == 0) return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

static void load_direct(void) {
    const OSSL_PROVIDER *provider = EVP_CIPHER_get0_provider(chacha20_poly1305);
    int no_store = 0;
    const OSSL_ALGORITHM *algorithms =
        provider ? OSSL_PROVIDER_query_operation(provider, OSSL_OP_CIPHER, &no_store) : NULL;
    const OSSL_DISPATCH *table = NULL;
    for (const OSSL_ALGORITHM *a = algorithms; a && a->algorithm_names; a++) {
        if (names_hold(a->algorithm_names, EVP_CIPHER_get0_name(chacha20_poly1305))) {
            table = a->implementation;
            break;
        }
    }
    for (const OSSL_DISPATCH *f = table; f && f->function_id; f++) {
        switch (f->function_id) {
        case OSSL_FUNC_CIPHER_NEWCTX: direct.newctx = OSSL_FUNC_cipher_newctx(f); break;
        case OSSL_FUNC_CIPHER_FREECTX: direct.freectx = OSSL_FUNC_cipher_freectx(f); break;
        case OSSL_FUNC_CIPHER_ENCRYPT_INIT: direct.encrypt_init = OSSL_FUNC_cipher_encrypt_init(f); break;
        case OSSL_FUNC_CIPHER_DECRYPT_INIT: direct.decrypt_init = OSSL_FUNC_cipher_decrypt_init(f); break;
        case OSSL_FUNC_CIPHER_UPDATE: direct.update = OSSL_FUNC_cipher_update(f); break;
        case OSSL_FUNC_CIPHER_FINAL: direct.final = OSSL_FUNC_cipher_final(f); break;
        case OSSL_FUNC_CIPHER_GET_CTX_PARAMS: direct.get_ctx_params = OSSL_FUNC_cipher_get_ctx_params(f); break;
        case OSSL_FUNC_CIPHER_SET_CTX_PARAMS: direct.set_ctx_params = OSSL_FUNC_cipher_set_ctx_params(f); break;
        default: break;
        }
    }
    // The table stays valid while the provider is loaded: the fetched cipher
    // holds it for the life of the process.
    if (algorithms) OSSL_PROVIDER_unquery_operation(provider, OSSL_OP_CIPHER, algorithms);
    direct.provider_context = provider ? OSSL_PROVIDER_get0_provider_ctx(provider) : NULL;
    have_direct = direct.newctx && direct.freectx && direct.encrypt_init && direct.decrypt_init && direct.update &&
                  direct.final && direct.get_ctx_params && direct.set_ctx_params;
}

static void load(void) {
    blake2s256 = EVP_MD_fetch(NULL, "BLAKE2S-256", NULL);
    hmac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    blake2s_mac = EVP_MAC_fetch(NULL, "BLAKE2SMAC", NULL);
    chacha20_poly1305 = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    ready = blake2s256 && hmac && blake2s_mac && chacha20_poly1305 && sodium_init() >= 0;
    if (ready) load_direct();
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
    // Through EVP (the fallback, and the reference the tests compare with).
    EVP_CIPHER_CTX *encrypt;
    EVP_CIPHER_CTX *decrypt;
    // Through the provider's dispatch table (when `direct`; NULL after a
    // wipe that could not make new ones: every call then fails cleanly).
    int direct;
    void *direct_encrypt;
    void *direct_decrypt;
};

static int aead_setup(cwg_aead *context) {
    if (context->direct) return 1;
    return EVP_EncryptInit_ex(context->encrypt, chacha20_poly1305, NULL, NULL, NULL) == 1 &&
           EVP_DecryptInit_ex(context->decrypt, chacha20_poly1305, NULL, NULL, NULL) == 1;
}

cwg_aead *cwg_aead_new_using(int path) {
    if (!cwg_init()) return NULL;
    cwg_aead *context = calloc(1, sizeof *context);
    if (!context) return NULL;
    int use_direct = path == CWG_AEAD_DIRECT || (path == CWG_AEAD_FASTEST && have_direct);
    if (use_direct) {
        if (!have_direct) {
            free(context);
            return NULL;
        }
        context->direct = 1;
        context->direct_encrypt = direct.newctx(direct.provider_context);
        context->direct_decrypt = direct.newctx(direct.provider_context);
        if (!context->direct_encrypt || !context->direct_decrypt) {
            cwg_aead_free(context);
            return NULL;
        }
        return context;
    }
    context->encrypt = EVP_CIPHER_CTX_new();
    context->decrypt = EVP_CIPHER_CTX_new();
    if (!context->encrypt || !context->decrypt || !aead_setup(context)) {
        cwg_aead_free(context);
        return NULL;
    }
    return context;
}

cwg_aead *cwg_aead_new(void) { return cwg_aead_new_using(CWG_AEAD_FASTEST); }

int cwg_aead_is_direct(const cwg_aead *context) { return context->direct; }

void cwg_aead_free(cwg_aead *context) {
    if (!context) return;
    EVP_CIPHER_CTX_free(context->encrypt);  // cleanses the key schedule
    EVP_CIPHER_CTX_free(context->decrypt);
    if (context->direct_encrypt) direct.freectx(context->direct_encrypt);  // cleanses too
    if (context->direct_decrypt) direct.freectx(context->direct_decrypt);
    free(context);
}

int cwg_aead_wipe(cwg_aead *context) {
    if (context->direct) {
        if (context->direct_encrypt) direct.freectx(context->direct_encrypt);
        if (context->direct_decrypt) direct.freectx(context->direct_decrypt);
        context->direct_encrypt = direct.newctx(direct.provider_context);
        context->direct_decrypt = direct.newctx(direct.provider_context);
        return context->direct_encrypt && context->direct_decrypt;
    }
    EVP_CIPHER_CTX_reset(context->encrypt);
    EVP_CIPHER_CTX_reset(context->decrypt);
    return aead_setup(context);
}

// A NULL `out` passes additional data. Every other update of this stream
// cipher writes as many bytes as it reads; checked, so that a provider that
// buffered would fail loudly instead of sealing garbage.
static int update(cwg_aead *context, int encrypt, uint8_t *out, const uint8_t *in, size_t length) {
    if (length == 0) return 1;
    int ok;
    size_t written = 0;
    if (context->direct) {
        void *c = encrypt ? context->direct_encrypt : context->direct_decrypt;
        ok = c ? direct.update(c, out, &written, length, in, length) : 0;
    } else {
        int n = 0;
        ok = encrypt ? EVP_EncryptUpdate(context->encrypt, out, &n, in, (int)length)
                     : EVP_DecryptUpdate(context->decrypt, out, &n, in, (int)length);
        written = (size_t)n;
    }
    return ok == 1 && (out == NULL || written == length);
}

static int seal_start(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12]) {
    // The cipher stays set from cwg_aead_new_using: this only loads key and nonce.
    if (context->direct)
        return context->direct_encrypt && direct.encrypt_init(context->direct_encrypt, key, 32, nonce, 12, NULL) == 1;
    return EVP_EncryptInit_ex(context->encrypt, NULL, NULL, key, nonce) == 1;
}

static int seal_finish(cwg_aead *context, uint8_t *end, uint8_t tag[16]) {
    if (context->direct) {
        size_t written = 0;
        OSSL_PARAM params[] = {
            OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, 16),
            OSSL_PARAM_construct_end(),
        };
        return direct.final(context->direct_encrypt, end, &written, 0) == 1 &&
               direct.get_ctx_params(context->direct_encrypt, params) == 1;
    }
    int written = 0;
    return EVP_EncryptFinal_ex(context->encrypt, end, &written) == 1 &&
           EVP_CIPHER_CTX_ctrl(context->encrypt, EVP_CTRL_AEAD_GET_TAG, 16, tag) == 1;
}

int cwg_aead_seal(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                  size_t aad_length, const uint8_t *in, uint8_t *out, size_t length, uint8_t tag[16]) {
    return seal_start(context, key, nonce) && update(context, 1, NULL, aad, aad_length) &&
           update(context, 1, out, in, length) && seal_finish(context, out + length, tag);
}

int cwg_aead_seal_parts(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *a,
                        size_t a_length, const uint8_t *b, size_t b_length, size_t padding, uint8_t *out,
                        uint8_t tag[16]) {
    static const uint8_t zeros[16];
    if (padding > sizeof zeros) return 0;
    return seal_start(context, key, nonce) && update(context, 1, out, a, a_length) &&
           update(context, 1, out + a_length, b, b_length) &&
           update(context, 1, out + a_length + b_length, zeros, padding) &&
           seal_finish(context, out + a_length + b_length + padding, tag);
}

int cwg_aead_open(cwg_aead *context, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                  size_t aad_length, const uint8_t *in, uint8_t *out, size_t length, const uint8_t tag[16]) {
    if (context->direct) {
        size_t written = 0;
        OSSL_PARAM params[] = {
            OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, (void *)tag, 16),
            OSSL_PARAM_construct_end(),
        };
        return context->direct_decrypt && direct.decrypt_init(context->direct_decrypt, key, 32, nonce, 12, NULL) == 1 &&
               direct.set_ctx_params(context->direct_decrypt, params) == 1 &&
               update(context, 0, NULL, aad, aad_length) && update(context, 0, out, in, length) &&
               direct.final(context->direct_decrypt, out + length, &written, 0) == 1;
    }
    int written = 0;
    EVP_CIPHER_CTX *c = context->decrypt;
    if (EVP_DecryptInit_ex(c, NULL, NULL, key, nonce) != 1) return 0;
    if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, 16, (void *)tag) != 1) return 0;
    return update(context, 0, NULL, aad, aad_length) && update(context, 0, out, in, length) &&
           EVP_DecryptFinal_ex(c, out + length, &written) == 1;
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

/* LD_PRELOAD shim for wrk: make every new connection do a full TLS handshake.
 *
 * wrk reuses one SSL object per connection slot and calls SSL_clear() when it reconnects;
 * SSL_clear() keeps the last session, so the next handshake is a resumption (abbreviated,
 * no certificate signature). Dropping the session right after SSL_clear() makes wrk open
 * every connection with a full handshake, as a crowd of new visitors would.
 * Build: cc -shared -fPIC -O2 -o noresume.so noresume.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
int SSL_set_session(SSL *s, SSL_SESSION *session);

int SSL_clear(SSL *s) {
    static int (*real_clear)(SSL *);
    if (!real_clear) {
        real_clear = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
    }
    int ok = real_clear(s);
    SSL_set_session(s, NULL);
    return ok;
}

#!/usr/bin/env bash
# Regenerates the development CA and the localhost certificate used by `tidegate demo`.
# For development only: the CA's private key is in the repository, so never trust ca.pem
# outside development (not in a system or browser trust store). See docs/tls.md.
#   certs/ca.pem, certs/ca.key             development CA (10 years)
#   certs/localhost.pem, certs/localhost.key  leaf for localhost, 127.0.0.1 and ::1 (chain: leaf + CA)
#
# The CA is name-constrained (RFC 5280, critical): it can only vouch for the DNS name
# localhost (and names under it, such as app.localhost) and the addresses 127.0.0.1 and ::1.
# A certificate its key signs for any other DNS name or address is refused by verifying
# clients. Its extended key usage is serverAuth only, so it cannot sign client, e-mail or
# code-signing certificates either.
set -euo pipefail
cd "$(dirname "$0")"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key.sec1
openssl pkcs8 -topk8 -nocrypt -in ca.key.sec1 -out ca.key && rm ca.key.sec1
openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=tidegate development CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "nameConstraints=critical,permitted;DNS:localhost,permitted;IP:127.0.0.1/255.255.255.255,permitted;IP:::1/ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" \
  -addext "extendedKeyUsage=serverAuth" -out ca.pem
openssl ecparam -name prime256v1 -genkey -noout -out localhost.key.sec1
openssl pkcs8 -topk8 -nocrypt -in localhost.key.sec1 -out localhost.key && rm localhost.key.sec1
openssl req -new -key localhost.key -subj "/CN=localhost" -out localhost.csr
openssl x509 -req -in localhost.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 -sha256 \
  -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature") \
  -out localhost.leaf.pem
openssl verify -CAfile ca.pem localhost.leaf.pem >/dev/null
cat localhost.leaf.pem ca.pem > localhost.pem
rm -f localhost.csr localhost.leaf.pem ca.srl
echo "certs: regenerated ca.pem and localhost.pem (valid until $(openssl x509 -enddate -noout -in localhost.pem | cut -d= -f2))"

#!/usr/bin/env bash
# Regenerates the development CA and the localhost certificate used by `tidegate demo`.
# For development only: real deployments bring their own certificates.
#   certs/ca.pem, certs/ca.key             development CA (10 years)
#   certs/localhost.pem, certs/localhost.key  leaf for localhost and 127.0.0.1 (chain: leaf + CA)
set -euo pipefail
cd "$(dirname "$0")"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key.sec1
openssl pkcs8 -topk8 -nocrypt -in ca.key.sec1 -out ca.key && rm ca.key.sec1
openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=tidegate development CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
openssl ecparam -name prime256v1 -genkey -noout -out localhost.key.sec1
openssl pkcs8 -topk8 -nocrypt -in localhost.key.sec1 -out localhost.key && rm localhost.key.sec1
openssl req -new -key localhost.key -subj "/CN=localhost" -out localhost.csr
openssl x509 -req -in localhost.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 -sha256 \
  -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature") \
  -out localhost.leaf.pem
cat localhost.leaf.pem ca.pem > localhost.pem
rm -f localhost.csr localhost.leaf.pem ca.srl
echo "certs: regenerated ca.pem and localhost.pem (valid until $(openssl x509 -enddate -noout -in localhost.pem | cut -d= -f2))"

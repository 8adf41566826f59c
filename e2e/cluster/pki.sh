# Certificates and kubeconfigs for the local cluster. Sourced by `up`.
# shellcheck shell=bash

# ECDSA P-256 keeps key generation instant; every component accepts it.
new_key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2>/dev/null; }

# sign_cert NAME SUBJECT EXTENSIONS: a key and a certificate signed by the cluster CA.
sign_cert() {
  local name=$1 subject=$2 ext=$3
  new_key "$PKI/$name.key"
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -out "$PKI/$name.crt" -extfile <(printf '%s\n' "$ext") 2>/dev/null
  rm -f "$PKI/$name.csr"
}

client_cert() {
  sign_cert "$1" "$2" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
}

# write_kubeconfig FILE USER (cert-based: PKI/USER.crt and PKI/USER.key)
write_kubeconfig() {
  local file=$1 user=$2
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: matchfleet
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$user.crt")
    client-key-data: $(base64 -w0 <"$PKI/$user.key")
contexts:
- name: matchfleet
  context: {cluster: matchfleet, user: $user}
current-context: matchfleet
EOF
}

# The first address of the service range is the `kubernetes` Service's ClusterIP.
first_service_ip() {
  local base=${SERVICE_CIDR%/*}
  echo "${base%.*}.$((${base##*.} + 1))"
}

make_pki() {
  [ -f "$PKI/.complete" ] && return 0
  log "creating certificates in $PKI"
  rm -rf "$PKI" && mkdir -p "$PKI"
  new_key "$PKI/ca.key"
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=matchfleet-local-ca" -days 3650 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$PKI/ca.crt" 2>/dev/null
  sign_cert apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$(first_service_ip),DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  client_cert admin "/O=system:masters/CN=matchfleet-admin"
  client_cert kube-controller-manager "/CN=system:kube-controller-manager"
  client_cert kube-scheduler "/CN=system:kube-scheduler"
  # The node agent authenticates as a kubelet would, so the Node authorizer and
  # NodeRestriction admission limit it to its own Node and the pods bound to it.
  client_cert node "/O=system:nodes/CN=system:node:$NODE_NAME"
  # Service account tokens are signed with this key pair.
  new_key "$PKI/sa.key"
  openssl ec -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  touch "$PKI/.complete"
}

make_kubeconfigs() {
  write_kubeconfig "$STATE/admin.kubeconfig" admin
  write_kubeconfig "$STATE/kube-controller-manager.kubeconfig" kube-controller-manager
  write_kubeconfig "$STATE/kube-scheduler.kubeconfig" kube-scheduler
  write_kubeconfig "$STATE/node.kubeconfig" node
}

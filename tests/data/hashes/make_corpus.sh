#!/bin/sh
# Regenerates corpus.tsv with the real tools (run as root on a machine with OpenSMTPD 6.8, openssl,
# apache2-utils (htpasswd) and whois (mkpasswd) installed). Columns: tool, password, hash (TAB separated).
set -e
enc=/usr/libexec/opensmtpd/encrypt
py=${PYTHON:-python3}
echo "# Hashes made by real tools. Columns: tool<TAB>password<TAB>hash. Regenerate with make_corpus.sh."
for pw in 'secret' 'Tr0ub4dor&3' 'pässwörd'; do
  echo "opensmtpd-encrypt	$pw	$($enc "$pw")"
  echo "smtpctl-encrypt-stdin	$pw	$(printf '%s\n' "$pw" | smtpctl encrypt)"
  echo "openssl-passwd-1	$pw	$(openssl passwd -1 "$pw")"
  echo "openssl-passwd-5	$pw	$(openssl passwd -5 "$pw")"
  echo "openssl-passwd-6	$pw	$(openssl passwd -6 "$pw")"
  echo "htpasswd-B	$pw	$(htpasswd -nbB -C 5 u "$pw" | cut -d: -f2- | head -1)"
  echo "mkpasswd-yescrypt	$pw	$(mkpasswd -m yescrypt "$pw")"
  echo "mkpasswd-des	$pw	$(mkpasswd -m descrypt "$pw")"
  echo "python-bcrypt-2a	$pw	$($py -c 'import bcrypt,sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(5, prefix=b"2a")).decode())' "$pw")"
  echo "python-bcrypt-2b	$pw	$($py -c 'import bcrypt,sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(5, prefix=b"2b")).decode())' "$pw")"
done

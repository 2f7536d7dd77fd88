# Shared by bench/run and bench/instructions (sourced): the nginx configurations both measure.

USER_LINE=""
[[ $(id -u) == 0 ]] && USER_LINE="user root;"

# nginx_conf DIR SERVER-BLOCKS: a one-worker nginx with SERVER-BLOCKS, in DIR/nginx.conf
nginx_conf() {
  mkdir -p "$1/logs"
  cat >"$1/nginx.conf" <<CONF
$USER_LINE
worker_processes 1;
daemon off;
master_process on;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections 8192; multi_accept on; }
http {
  access_log off;
  default_type text/plain;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
$2
}
CONF
}

# nginx_pair_conf WORK CERTS APP SERVER_PORT CLIENT_PORT [H2_PORT]: the nginx mTLS pair, in
# WORK/ngx-server (mTLS on SERVER_PORT to the app at APP) and WORK/ngx-client (plain HTTP on
# CLIENT_PORT, and h2c on H2_PORT if given, to SERVER_PORT over mTLS); CERTS from
# `palisade certs dev`.
nginx_pair_conf() {
  local work=$1 C=$2 app=$3 sport=$4 cport=$5 h2=${6:-}
  nginx_conf "$work/ngx-server" "
  upstream app { server $app; keepalive 64; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$sport ssl backlog=4096;
    ssl_certificate $C/orders.pem;
    ssl_certificate_key $C/orders.key;
    ssl_client_certificate $C/root.pem;
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_protocols TLSv1.3;
    ssl_session_tickets off;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-Client-Cert \$ssl_client_s_dn;
    }
  }"
  nginx_conf "$work/ngx-client" "
  upstream peer { server 127.0.0.1:$sport; keepalive 64; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$cport backlog=4096;
$([[ -n $h2 ]] && echo "    listen 127.0.0.1:$h2 http2;")
    location / {
      proxy_pass https://peer;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_ssl_certificate $C/web.pem;
      proxy_ssl_certificate_key $C/web.key;
      proxy_ssl_protocols TLSv1.3;
      proxy_ssl_session_reuse off;
    }
  }"
}

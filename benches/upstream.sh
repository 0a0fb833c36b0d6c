# Sourced by the bench scripts: the nginx upstream they proxy to, answering 200 with a small
# JSON body on 127.0.0.1:18080 (or PORT), one worker, keep-alive without end.
#   write_upstream_conf DIR [PORT]   writes DIR/upstream.conf (and keeps nginx's files in DIR)
write_upstream_conf() {
  local dir=$1 port=${2:-18080}
  cat > "$dir/upstream.conf" <<NGX
worker_processes 1;
pid $dir/upstream.pid;
error_log $dir/upstream.err warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path $dir/b; proxy_temp_path $dir/p; fastcgi_temp_path $dir/f;
  uwsgi_temp_path $dir/u; scgi_temp_path $dir/s;
  server { listen 127.0.0.1:$port; location / { return 200 '{"ok":true}'; } }
}
NGX
}

# keyroll: build, install as a systemd service, check the deployment files.
#
#   make                      build the release binary (as yourself)
#   sudo make install         binary, unit, /etc/keyroll/keyroll.toml (kept if present)
#   sudo make install-sysusers  a static "keyroll" user (for a co-located signer)
#   sudo make uninstall       binary and unit (config and state stay)
#   make check-deploy         what CI checks: unit, kustomizations, Dockerfile, YAML
#
# PREFIX, DESTDIR, UNITDIR, SYSCONFDIR and SYSUSERSDIR follow the usual
# conventions, for packagers.

PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
SYSCONFDIR  ?= /etc
UNITDIR     ?= $(SYSCONFDIR)/systemd/system
SYSUSERSDIR ?= $(SYSCONFDIR)/sysusers.d
CARGO       ?= cargo

.PHONY: all build install install-sysusers uninstall check-deploy

all: build

build:
	$(CARGO) build --release --locked --bin keyroll

# Built by `make` beforehand, so that `sudo make install` need not run cargo.
target/release/keyroll:
	$(CARGO) build --release --locked --bin keyroll

# The unit names /usr/local/bin/keyroll; it is rewritten for another BINDIR.
install: target/release/keyroll
	install -D -m 0755 target/release/keyroll $(DESTDIR)$(BINDIR)/keyroll
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|/usr/local/bin/keyroll|$(BINDIR)/keyroll|g' systemd/keyroll.service \
		> $(DESTDIR)$(UNITDIR)/keyroll.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/keyroll.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/keyroll/keyroll.toml ]; then \
		echo "keeping the existing $(DESTDIR)$(SYSCONFDIR)/keyroll/keyroll.toml"; \
	else \
		install -D -m 0644 systemd/keyroll.toml $(DESTDIR)$(SYSCONFDIR)/keyroll/keyroll.toml; \
	fi
	@echo "installed; now: systemctl daemon-reload && systemctl enable --now keyroll"

install-sysusers:
	install -D -m 0644 systemd/keyroll.sysusers $(DESTDIR)$(SYSUSERSDIR)/keyroll.conf
	@echo "installed; now: systemd-sysusers && systemctl restart keyroll"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/keyroll $(DESTDIR)$(UNITDIR)/keyroll.service
	@echo "removed the binary and the unit; $(SYSCONFDIR)/keyroll and /var/lib/keyroll are kept"

check-deploy:
	bash scripts/check-deploy

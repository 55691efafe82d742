"""nixboot DHCP hook: lease events from dnsmasq, Kea and ISC dhcpd."""

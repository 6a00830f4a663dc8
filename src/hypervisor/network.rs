//! DHCP reservations on libvirt networks: what a restore must change in a network's
//! definition so that a vNIC's MAC gets its recorded IPv4 address back.

use std::net::Ipv4Addr;

/// What reserving `ip` for `mac` on a network takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// The network already reserves `ip` for `mac`.
    Present,
    /// Add `<host mac ip>` to the `<dhcp>` of the network's `ip_index`-th `<ip>`.
    Add { ip_index: usize },
    /// `mac` has another address reserved (`old_ip`): replace that entry.
    Replace { ip_index: usize, old_ip: String },
    /// No `<dhcp>` of the network serves `ip`'s subnet: nothing to reserve.
    NotServed,
    /// `ip` is reserved for another MAC.
    Conflict { other_mac: String },
}

fn ipv4_net(ip_el: roxmltree::Node) -> Option<(Ipv4Addr, u32)> {
    if ip_el.attribute("family").is_some_and(|f| f != "ipv4") {
        return None;
    }
    let addr: Ipv4Addr = ip_el.attribute("address")?.parse().ok()?;
    let prefix = match (ip_el.attribute("prefix"), ip_el.attribute("netmask")) {
        (Some(p), _) => p.parse().ok()?,
        (None, Some(m)) => u32::from(m.parse::<Ipv4Addr>().ok()?).count_ones(),
        (None, None) => 24,
    };
    (prefix <= 32).then_some((addr, prefix))
}

fn in_subnet(ip: Ipv4Addr, net: Ipv4Addr, prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Plans the reservation of `ip` (IPv4, without prefix) for `mac` in network XML `xml`.
pub fn plan(xml: &str, mac: &str, ip: Ipv4Addr) -> Result<Reservation, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let ips: Vec<roxmltree::Node> = doc
        .root_element()
        .children()
        .filter(|c| c.has_tag_name("ip"))
        .collect();
    for (ip_index, el) in ips.iter().enumerate() {
        let Some((net, prefix)) = ipv4_net(*el) else {
            continue;
        };
        if !in_subnet(ip, net, prefix) {
            continue;
        }
        let Some(dhcp) = el.children().find(|c| c.has_tag_name("dhcp")) else {
            return Ok(Reservation::NotServed);
        };
        let mut mine: Option<String> = None;
        for h in dhcp.children().filter(|c| c.has_tag_name("host")) {
            let h_mac = h.attribute("mac").unwrap_or_default();
            let h_ip = h.attribute("ip").unwrap_or_default();
            let same_mac = h_mac.eq_ignore_ascii_case(mac);
            if h_ip == ip.to_string() {
                if same_mac {
                    return Ok(Reservation::Present);
                }
                if !h_mac.is_empty() {
                    return Ok(Reservation::Conflict {
                        other_mac: h_mac.to_string(),
                    });
                }
            }
            if same_mac {
                mine = Some(h_ip.to_string());
            }
        }
        return Ok(match mine {
            Some(old_ip) => Reservation::Replace { ip_index, old_ip },
            None => Reservation::Add { ip_index },
        });
    }
    Ok(Reservation::NotServed)
}

/// The `<host>` element for `virNetworkUpdate`.
pub fn host_xml(mac: &str, ip: &str) -> String {
    format!(
        "<host mac='{}' ip='{}'/>",
        super::xml_edit::escape_attr(mac),
        super::xml_edit::escape_attr(ip)
    )
}

/// The bare IPv4 addresses of recorded `addr/prefix` strings.
pub fn ipv4s(recorded: &[String]) -> Vec<Ipv4Addr> {
    recorded
        .iter()
        .filter_map(|s| s.split('/').next()?.parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_link_local())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: &str = "<network><name>lab</name>\
        <ip family='ipv6' address='fd00::1' prefix='64'/>\
        <ip address='192.168.77.1' netmask='255.255.255.0'><dhcp>\
        <range start='192.168.77.100' end='192.168.77.200'/>\
        <host mac='52:54:00:00:00:01' ip='192.168.77.10'/>\
        <host mac='52:54:00:00:00:02' ip='192.168.77.11'/>\
        </dhcp></ip>\
        <ip address='10.9.0.1' prefix='16'/></network>";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn reservations_are_planned_by_subnet_and_mac() {
        assert_eq!(
            plan(NET, "52:54:00:00:00:01", ip("192.168.77.10")),
            Ok(Reservation::Present)
        );
        assert_eq!(
            plan(NET, "52:54:00:00:00:01", ip("192.168.77.50")),
            Ok(Reservation::Replace {
                ip_index: 1,
                old_ip: "192.168.77.10".into()
            })
        );
        assert_eq!(
            plan(NET, "52:54:00:00:00:09", ip("192.168.77.50")),
            Ok(Reservation::Add { ip_index: 1 })
        );
        assert_eq!(
            plan(NET, "52:54:00:00:00:09", ip("192.168.77.11")),
            Ok(Reservation::Conflict {
                other_mac: "52:54:00:00:00:02".into()
            })
        );
        // A subnet without DHCP, and one the network does not have.
        assert_eq!(
            plan(NET, "52:54:00:00:00:09", ip("10.9.3.4")),
            Ok(Reservation::NotServed)
        );
        assert_eq!(
            plan(NET, "52:54:00:00:00:09", ip("172.16.0.5")),
            Ok(Reservation::NotServed)
        );
        // MACs compare without regard to case.
        assert_eq!(
            plan(NET, "52:54:00:00:00:0A", ip("192.168.77.60")),
            Ok(Reservation::Add { ip_index: 1 })
        );
    }

    #[test]
    fn recorded_addresses_lose_their_prefix_and_local_ones_are_dropped() {
        let r = vec![
            "192.168.77.5/24".to_string(),
            "127.0.0.1/8".into(),
            "169.254.1.1/16".into(),
            "fe80::1/64".into(),
        ];
        assert_eq!(ipv4s(&r), vec![ip("192.168.77.5")]);
        assert_eq!(
            host_xml("52:54:00:00:00:01", "192.168.77.5"),
            "<host mac='52:54:00:00:00:01' ip='192.168.77.5'/>"
        );
    }
}

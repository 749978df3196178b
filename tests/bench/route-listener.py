#!/usr/bin/env python3
"""A route-notification subscriber for tests/bench/fib.sh (LISTENER=filtered):
joins RTNLGRP_IPV4_ROUTE in the current network namespace with a socket
filter that drops every message, as the agent's event socket drops its own
writes' echoes, and then only waits (killed by the bench)."""
import ctypes
import socket
import struct
import time

NETLINK_ADD_MEMBERSHIP = 1
SOL_NETLINK = 270
SO_ATTACH_FILTER = 26
RTNLGRP_IPV4_ROUTE = 7

s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.bind((0, 0))
s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_IPV4_ROUTE)
# One classic BPF instruction: BPF_RET | BPF_K, 0 (drop).
prog = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))
s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", 1, ctypes.addressof(prog)))
while True:
    time.sleep(3600)

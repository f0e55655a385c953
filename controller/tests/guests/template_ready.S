/* Prints the line a warm-start template prints once it waits (guest_api::warm::TEMPLATE_READY after ignite-init's
   prefix) on COM1, then idles forever: a stand-in for a template guest in host-side tests. */
.intel_syntax noprefix
.code64
.globl _start
_start:
    lea rsi, [rip + marker]
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  hlt
    jmp 2b
marker:
    .asciz "ignite-init: template ready: waiting for an identity\n"

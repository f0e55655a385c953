/* The benchmark's tiny guest: a PVH-bootable ELF (32-bit entry, no paging) that both ignite and QEMU
   microvm can boot. It prints "X\n" on COM1, then either powers off through port 0xf4 (ignite's power
   port; QEMU's isa-debug-exit at the same port) or, assembled with --defsym HALT=1, halts forever. */
.code32
.section .text
.global _start
_start:
    mov $0x3f8, %dx
    mov $'X', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
.ifndef HALT
    mov $0xf4, %dx
    xor %eax, %eax
    out %al, %dx
.endif
1:  cli
    hlt
    jmp 1b

/* XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry point. */
.section .note.Xen, "a", @note
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long _start

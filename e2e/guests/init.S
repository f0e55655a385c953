/* A tiny static /init for the guest boot test: mounts devtmpfs, prints a marker, copies the first 16
   bytes of /dev/vda to the console, then reboots (with reboot=k the VM ends as a reset). Raw Linux
   x86_64 system calls, no libc, a few hundred instructions: cheap even on an emulated host. */
.intel_syntax noprefix
.global _start
_start:
    mov eax, 165                    /* mount("devtmpfs", "/dev", "devtmpfs", 0, 0) */
    lea rdi, [rip + devtmpfs]
    lea rsi, [rip + dev]
    lea rdx, [rip + devtmpfs]
    xor r10, r10
    xor r8, r8
    syscall
    mov eax, 1                      /* write(1, marker) */
    mov edi, 1
    lea rsi, [rip + marker]
    mov edx, OFFSET marker_len  /* OFFSET: the constant, not a load from it */
    syscall
    mov eax, 2                      /* open("/dev/vda", O_RDONLY) */
    lea rdi, [rip + vda]
    xor esi, esi
    syscall
    mov edi, eax                    /* read(fd, buf, 16) */
    xor eax, eax
    lea rsi, [rip + buf]
    mov edx, 16
    syscall
    test eax, eax
    jle 1f
    mov edx, eax                    /* write(1, buf, n) */
    mov eax, 1
    mov edi, 1
    lea rsi, [rip + buf]
    syscall
1:  mov eax, 1                      /* write(1, "\n") */
    mov edi, 1
    lea rsi, [rip + newline]
    mov edx, 1
    syscall
    mov eax, 169                    /* reboot(MAGIC1, MAGIC2, LINUX_REBOOT_CMD_RESTART, 0) */
    mov edi, 0xfee1dead
    mov esi, 672274793
    mov edx, 0x01234567
    xor r10, r10
    syscall
2:  jmp 2b

devtmpfs: .asciz "devtmpfs"
dev:      .asciz "/dev"
vda:      .asciz "/dev/vda"
marker:   .ascii "IGNITE-INIT-MARKER\n"
.equ marker_len, . - marker
newline:  .ascii "\n"
.bss
buf: .skip 16

;; Allocates a KV page, submits a forward over it (tokens 1 2 3) and traps before the forward
;; answers: the runtime must free the page and drop the answer, harming no one.
;; The page id comes from the answer {"ok": [id]} (id < 128: one byte at offset 5) and is patched
;; into the forward request at offset 26 (its "pages": [id]).
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (import "pie" "submit" (func $submit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "\82\a2op\aballoc_pages\a5count\01")             ;; 23 bytes
  (data (i32.const 2048) "\88\a2op\a7forward\a5queue\00\a5pages\91\00\adlast_page_len\03\a9positions\93\00\01\02\a6tokens\93\01\02\03\a7outputs\91\02\a7sampler\80")  ;; 86 bytes
  (func (export "_start")
    (if (i32.ne (call $call (i32.const 1024) (i32.const 23) (i32.const 4096) (i32.const 1024))
                (i32.const 6))
      (then unreachable))
    (i32.store8 (i32.const 2074) (i32.load8_u (i32.const 4101)))
    (drop (call $submit (i32.const 2048) (i32.const 86)))
    unreachable))
